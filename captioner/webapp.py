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

from .errors import CaptionerError, ConfigError  # noqa: E402
from .model import Captioner  # noqa: E402
from .runtime import EXAMPLES_DIR  # noqa: E402


MAX_FILE_SIZE = "20mb"
CONCURRENCY_LIMIT = 2  # requests decoded at once; the rest wait in the queue
QUEUE_SIZE = 64  # waiting requests beyond this are refused rather than piling up in memory
STRATEGY_LABELS = {"Beam search": "beam", "Greedy": "greedy", "Sampling": "sample"}
CACHE_CLEANUP = (300, 900)  # every 5 minutes, delete uploads older than 15 minutes (non-images included)
# Plain system fonts: the default theme would fetch Google Fonts, which an offline machine cannot.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def original_upload(component: gr.Image) -> gr.Image:
    """Hand our image loader the uploaded file itself, unopened.

    Gradio's own preprocessing opens every upload with PIL and, for most modes, re-encodes it (a 16-bit
    PNG became all white), and its failures surface as a bare "Error". Our loader reads the original
    bytes instead, with its own bounds and one-line reasons, exactly as the API and the CLI do. Pasted
    and webcam images arrive as data URLs and are left to Gradio to write to a file. (Wrapping the
    instance's method rather than subclassing: Gradio writes a ``.pyi`` stub next to the module of
    every component subclass.)
    """
    decode = component.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None or (payload.url or "").startswith("data:"):
            return decode(payload)
        return payload.path

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
    mode = STRATEGY_LABELS.get(strategy, strategy)
    try:
        num_captions = _whole(num_captions, "num_captions")
        options = dict(strategy=mode, max_length=_whole(max_length, "max_length"),
                       num_return_sequences=1 if mode == "greedy" else num_captions)
        if mode == "beam":  # the beam is raised to the number of captions asked for
            options["beam_size"] = max(_whole(beam_size, "beam_size") or model.generation_config.beam_size, num_captions)
        if mode == "sample":
            options.update(temperature=temperature, seed=_whole(seed, "seed"))
        config = model.generation_config.updated(**options)  # None keeps the model's own setting
        started = time.perf_counter()
        features = model.encode([image])
        encoded = time.perf_counter()
        captions = model.generate(features, config)[0]
        finished = time.perf_counter()
    except CaptionerError as exc:  # name the upload, not where the server keeps it
        raise gr.Error(str(exc).replace(str(image), Path(image).name).replace(os.getcwd(), ".")) from None
    best = captions[0]
    rows = [[c.text, round(c.log_prob, 3), f"{math.exp(c.log_prob):.2%}"] for c in captions]
    words = [(token + " ", round(math.exp(lp), 3)) for token, lp in zip(best.tokens, best.token_log_probs)]
    timing = (f"{(finished - started) * 1000:.0f} ms: encoder {(encoded - started) * 1000:.0f} ms, "
              f"decoder {(finished - encoded) * 1000:.0f} ms ({mode}, {model.encoder.config.name}, "
              f"{model.device.type})")
    return best.text, rows, words, timing


def _whole(value, name: str) -> int | None:
    """Sliders send numbers as floats (3.0): accept whole ones as ints; the bounds are the config's."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"{name} must be a whole number, not {str(value)[:20]!r}")


def build_demo(model: Captioner) -> gr.Blocks:
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
    with gr.Blocks(title="captioner", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown("# captioner\nShow-and-Tell image captioning: a CNN encodes the photo, an LSTM writes "
                    "the caption word by word.")
        with gr.Row():
            with gr.Column():
                image = original_upload(gr.Image(type="filepath", image_mode=None, label="Photo", height=360,
                                                 sources=["upload", "clipboard", "webcam"]))
                button = gr.Button("Caption", variant="primary")
                with gr.Accordion("Decoding", open=False):
                    strategy = gr.Radio(list(STRATEGY_LABELS), value="Beam search", label="Strategy")
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
           device: str = "auto", block: bool = True) -> gr.Blocks:
    """Load the model once, then serve the demo (127.0.0.1:7860 unless told otherwise)."""
    torch.set_grad_enabled(False)
    model = Captioner.from_pretrained(model_dir, device=device)
    demo = build_demo(model)
    demo.launch(server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(port or os.environ.get("GRADIO_SERVER_PORT", 7860)), share=False,
                max_file_size=MAX_FILE_SIZE, show_error=True, theme=THEME, ssr_mode=False,
                footer_links=["api"], allowed_paths=[str(EXAMPLES_DIR)], prevent_thread_lock=not block)
    return demo
