"""The Gradio demo: ``python app.py [--model DIR] [--host H] [--port P]`` (or ``make demo``).

The same as ``captioner demo``: serves on 127.0.0.1:7860 unless ``--host/--port`` or
``GRADIO_SERVER_NAME/GRADIO_SERVER_PORT`` say otherwise; uses the bundled model unless ``--model``
names a checkpoint directory.
"""

import sys

from captioner.cli import demo_main

if __name__ == "__main__":
    sys.exit(demo_main())
