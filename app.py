"""Gradio web demo (placeholder until the app lands): `make demo` runs this."""

import sys

if __name__ == "__main__":
    print("The Gradio demo is not built yet; use `captioner caption PATH` meanwhile.", file=sys.stderr)
    sys.exit(0)
