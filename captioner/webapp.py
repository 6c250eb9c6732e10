"""The Gradio demo: upload, paste, drop or shoot a photo, get its caption, the n-best list and how sure
the model was of each word. ``app.py`` only parses arguments and calls :func:`launch`.

Works offline: analytics are off, there is no share link, and no external fonts or scripts are
requested. Uploads are capped in size, requests are queued with a concurrency limit, and every bad
upload becomes a ``gr.Error`` with a one-line reason while the server keeps serving. The public API
endpoint ``/caption`` returns the best caption as its first output.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from .errors import CaptionerError, ImageError  # noqa: E402
from .images import load_image  # noqa: E402
from .model import ASSETS, Captioner  # noqa: E402
from .onnx_engine import ENGINE_NAMES  # noqa: E402

EXAMPLES_DIR = ASSETS / "examples"
MAX_FILE_SIZE = "20mb"
CONCURRENCY_LIMIT = 2  # requests decoded at once; the rest wait in the queue
QUEUE_SIZE = 64  # waiting requests beyond this are refused rather than piling up in memory
STRATEGIES = {"Beam search": "beam", "Greedy": "greedy", "Sampling": "sample"}
# Plain system fonts: the default theme would fetch Google Fonts, which an offline machine cannot.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def guard_decoding(component: gr.Image) -> gr.Image:
    """Make the component's own decoding failures a clear ``gr.Error`` instead of a bare 'Error'.

    Gradio opens uploads with PIL before our function runs. (Wrapping the instance's method rather than
    subclassing: Gradio writes a ``.pyi`` stub next to the module of every component subclass.)
    """
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Exception as exc:  # PIL raises many types for non-images and bombs: name the reason our way
            name = getattr(payload, "orig_name", None) or "upload"
            try:
                load_image(payload.path)
            except ImageError as reason:
                raise gr.Error(str(reason).replace(str(payload.path), name)) from None
            except Exception:
                pass
            raise gr.Error(f"{name}: not a readable image ({type(exc).__name__})") from None

    component.preprocess = preprocess
    return component


def caption_photo(model: Captioner, image: str | None, strategy: str = "Beam search", beam_size: int | None = None,
                  temperature: float = 1.0, num_captions: int = 3, max_length: int | None = None,
                  seed: int | None = None):
    """Caption one uploaded image for the UI and the API (the UI's defaults are these defaults).

    ``beam_size`` and ``max_length`` default to the model's own decoding settings. Returns ``(best
    caption, n-best rows, per-word confidences, timing text)``.
    """
    if image is None:
        raise gr.Error("no image: upload, paste, drop or take a photo first")
    mode = STRATEGIES.get(strategy, strategy)
    beam_size = int(beam_size or model.generation_config.beam_size)
    max_length = int(max_length or model.generation_config.max_length)
    num_captions = int(num_captions)
    options = dict(strategy=mode, max_length=max_length,
                   num_return_sequences=1 if mode == "greedy" else num_captions)
    if mode == "beam":
        options["beam_size"] = max(beam_size, num_captions)
    if mode == "sample":
        options.update(temperature=float(temperature), seed=seed)
    try:
        started = time.perf_counter()
        features = model.encode([image])
        encoded = time.perf_counter()
        captions = model.generate(features, **options)[0]
        finished = time.perf_counter()
    except CaptionerError as exc:
        raise gr.Error(str(exc).replace(str(image), Path(image).name)) from None
    best = captions[0]
    rows = [[c.text, round(c.log_prob, 3), f"{math.exp(c.log_prob):.2%}"] for c in captions]
    words = [(token + " ", round(math.exp(lp), 3)) for token, lp in zip(best.tokens, best.token_log_probs)]
    timing = (f"{(finished - started) * 1000:.0f} ms: encoder {(encoded - started) * 1000:.0f} ms, "
              f"decoder {(finished - encoded) * 1000:.0f} ms ({mode}, {model.encoder.config.name}, "
              f"{model.device.type}, {ENGINE_NAMES[model.engine]})")
    return best.text, rows, words, timing


def build_demo(model: Captioner) -> gr.Blocks:
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
    with gr.Blocks(title="captioner", analytics_enabled=False) as demo:
        gr.Markdown("# captioner\nShow-and-Tell image captioning: a CNN encodes the photo, an LSTM writes "
                    "the caption word by word.")
        with gr.Row():
            with gr.Column():
                image = guard_decoding(gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"],
                                                label="Photo", height=360))
                button = gr.Button("Caption", variant="primary")
                with gr.Accordion("Decoding", open=False):
                    strategy = gr.Radio(list(STRATEGIES), value="Beam search", label="Strategy")
                    beam_size = gr.Slider(1, 10, value=model.generation_config.beam_size, step=1,
                                          label="Beam size (raised to the number of captions)")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.1, label="Temperature (sampling)")
                    num_captions = gr.Slider(1, 5, value=3, step=1, label="Number of captions")
                    max_length = gr.Slider(5, 30, value=model.generation_config.max_length, step=1,
                                           label="Maximum length (words)")
                if examples:
                    gr.Examples(examples, inputs=image, label="Examples (COCO photos, CC BY / CC BY-SA)")
            with gr.Column():
                best = gr.Textbox(label="Caption", elem_id="best-caption", interactive=False, lines=2)
                words = gr.HighlightedText(label="Confidence per word (probability of each word)",
                                           show_legend=True, elem_id="word-confidence")
                nbest = gr.Dataframe(headers=["caption", "log-probability", "probability"],
                                     label="All captions", interactive=False, elem_id="nbest")
                timing = gr.Markdown(elem_id="timing")

        def run(image, strategy, beam_size, temperature, num_captions, max_length):
            return caption_photo(model, image, strategy, beam_size, temperature, num_captions, max_length)

        button.click(run, [image, strategy, beam_size, temperature, num_captions, max_length],
                     [best, nbest, words, timing], api_name="caption")
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def launch(model_dir: str | None = None, host: str | None = None, port: int | None = None,
           device: str = "auto", block: bool = True, engine: str = "auto") -> gr.Blocks:
    """Load the model once, then serve the demo (127.0.0.1:7860 unless told otherwise).

    ``engine="auto"`` serves with ONNX Runtime, the faster engine on a CPU, when the model has an ONNX
    export (``make setup`` writes the bundled model's).
    """
    torch.set_grad_enabled(False)
    model = Captioner.from_pretrained(model_dir, device=device, engine=engine)
    demo = build_demo(model)
    demo.launch(server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(port or os.environ.get("GRADIO_SERVER_PORT", 7860)), share=False,
                max_file_size=MAX_FILE_SIZE, show_error=True, theme=THEME, ssr_mode=False,
                footer_links=["api"], allowed_paths=[str(EXAMPLES_DIR)], prevent_thread_lock=not block)
    return demo
