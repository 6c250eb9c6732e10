"""The Gradio demo: ``python app.py [--model DIR] [--host H] [--port P]`` (or ``make demo``).

Serves on 127.0.0.1:7860 unless ``--host/--port`` or ``GRADIO_SERVER_NAME/GRADIO_SERVER_PORT`` say
otherwise; uses the bundled model unless ``--model`` names a checkpoint directory.
"""

import argparse
import sys

from captioner.errors import CaptionerError
from captioner.onnx_engine import ENGINES


def main() -> int:
    parser = argparse.ArgumentParser(description="captioner web demo")
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model in assets/model)")
    parser.add_argument("--host", help="interface to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="ONNX Runtime (CPU, needs the model's ONNX export) or PyTorch; auto: ONNX Runtime "
                             "when on the CPU and exported (default: auto)")
    args = parser.parse_args()
    from captioner.webapp import launch

    try:
        launch(args.model, args.host, args.port, args.device, engine=args.engine)
    except CaptionerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
