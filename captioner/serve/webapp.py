"""The Gradio demo: upload, paste, drop or shoot a photo, get its caption, the n-best list and how sure
the model was of each word. ``app.py`` only parses arguments and calls :func:`launch`.

Works offline: analytics are off, there is no share link, and no external fonts or scripts are
requested. Uploads are capped in size, requests are queued with a concurrency limit, and every bad
upload becomes a ``gr.Error`` with a one-line reason while the server keeps serving. The public API
endpoint ``/caption`` returns the best caption as its first output. The same process serves the plain
HTTP API (:mod:`.http`) under ``/v1``; the page's events and those requests share one :class:`Batcher`, the
model's only worker, so concurrent requests of either kind are decoded together rather than competing for
the cores.
"""

from __future__ import annotations

import html
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from gradio.exceptions import ComponentProcessingError  # noqa: E402

from ..errors import CaptionerError, ConfigError  # noqa: E402
from ..models.captioner import Captioner  # noqa: E402
from ..runtime import ENGINE_NAMES  # noqa: E402
from ..runtime import BUNDLED_MODEL_CARD, EXAMPLES_DIR  # noqa: E402
from ..models.pipeline import TOP_LABELS  # noqa: E402
from .batcher import BatchConfig, Batcher, caption_now  # noqa: E402
from .http import MAX_BODY_BYTES, mounted_beside  # noqa: E402

CONCURRENCY_LIMIT = 2  # requests decoded at once without a batcher; with one, a batch's worth
QUEUE_SIZE = 64  # waiting requests beyond this are refused rather than piling up in memory
STRATEGY_LABELS = {"Beam search": "beam", "Greedy": "greedy", "Sampling": "sample"}
EXAMPLES = {"skier.jpg": "skier", "aerial-skier.jpg": "freestyle skier", "dog-frisbee.jpg": "dog and frisbee",
            "skateboarder.jpg": "skateboarder", "bus.jpg": "bus"}
ABOUT_MODEL = ("**The bundled model was trained on Flickr8k (people and dogs outdoors) and 686 everyday MS-COCO "
               "photos (streets, kitchens, food, animals, vehicles).** It describes such scenes; rarer ones it "
               "names roughly, and the CNN's ImageNet labels below show what the image model recognises. "
               "See the model card below.")
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

    component.preprocess = preprocess  # type: ignore[method-assign]  # on purpose: see the docstring
    return component


@dataclass
class PhotoResult:
    """One photo's captions, ready for the page and the API."""

    best: str
    rows: list[list[str]]  # n-best: caption, share of the n-best mass, mean per-word probability
    words: list[tuple[str, float]]  # the best caption's words (and <end>) with their probabilities
    labels: dict[str, float]  # the CNN's top ImageNet labels
    timing: str


def caption_photo(model: Captioner, image: str | None, strategy: str | None = "Beam search",
                  beam_size: int | None = None, temperature: float = 1.0, num_captions: int | None = 3,
                  max_length: int | None = None, seed: int | None = None,
                  batcher: Batcher | None = None) -> PhotoResult:
    """Caption one uploaded image for the page and the API (the page's defaults are these defaults).

    ``strategy``, ``beam_size`` and ``max_length`` given as ``None`` are the model's own decoding settings; beam
    search widens the beam to the number of captions asked for. Bad input raises ``gr.Error`` with one line
    naming the upload. With a ``batcher``, the photo joins its next batch; without one, it is captioned here.
    """
    if image is None:
        raise user_error("no image: upload, paste, drop or take a photo first")
    mode = model.generation_config.strategy if strategy is None else STRATEGY_LABELS.get(strategy, strategy)
    try:
        num_captions = _whole(num_captions, "num_captions")
        options: dict[str, object] = dict(strategy=mode, max_length=_whole(max_length, "max_length"),
                                          num_return_sequences=1 if mode == "greedy" else num_captions)
        if mode == "beam" and (beam := _whole(beam_size, "beam_size")) is not None:
            # The page's two sliders are set apart: more captions than beams widens the beam, as it says.
            options["beam_size"] = max(beam, num_captions or 1)
        if mode == "sample":
            options.update(temperature=temperature, seed=_whole(seed, "seed"))
        config = model.generation_config.updated(**options)  # None keeps the model's own setting
        result = caption_now(model, image, config) if batcher is None else batcher.caption(image, config)
    except CaptionerError as exc:  # name the upload, not where the server keeps it
        raise user_error(str(exc).replace(str(image), Path(image).name).replace(os.getcwd(), ".")) from None
    # Shares of the n-best mass and per-word probabilities: numbers a person can read, unlike a whole
    # caption's probability (about 1e-5). Rows are ordered by share, the order of the model's likelihood.
    captions, took = result.prediction.captions, result.timing
    top = max(c.log_prob for c in captions)
    mass = [math.exp(c.log_prob - top) for c in captions]
    ranked = sorted(zip(captions, mass), key=lambda pair: -pair[1])
    rows = [[c.text, f"{m / sum(mass):.0%}", f"{math.exp(c.log_prob / max(1, len(c.token_log_probs))):.0%}"]
            for c, m in ranked]
    best = captions[0]
    words = [(token, math.exp(lp)) for token, lp in zip([*best.tokens, "<end>"], best.token_log_probs)]
    search = f"beam search of {config.beam_size}" if config.strategy == "beam" else config.strategy
    batched = f", queued {took.queued * 1000:.0f} ms, batch of {took.batch}" if batcher is not None else ""
    timing = (f"{(took.encoder + took.decoder) * 1000:.0f} ms: encoder {took.encoder * 1000:.0f} ms, "
              f"decoder {took.decoder * 1000:.0f} ms ({search}, {model.encoder.config.name}, "
              f"{model.device.type}, {ENGINE_NAMES[model.engine]}{batched})")
    return PhotoResult(best.text, rows, words, dict(result.prediction.labels or []), timing)


def user_error(message: str) -> gr.Error:
    """A bad request: one line in the server's log (not Gradio's traceback) and a ``gr.Error`` for the user."""
    log.warning("refused a request: %s", message)
    return gr.Error(message, print_exception=False)


def quiet_refusals(demo: gr.Blocks) -> gr.Blocks:
    """Refuse values that Gradio's own input checks reject (a slider's range, a radio's choices) as ours are.

    Those checks raise ``gr.Error`` with ``print_exception`` left on, or, for a value of the wrong type, a
    ``ComponentProcessingError``, and Gradio's queue prints a traceback for either (``show_error`` only decides
    what the user sees; ``from None`` changes nothing). Wrapped here on the one ``Blocks`` rather than on each
    component, since each session's state holds fresh copies of any component an event has updated.
    """
    preprocess = demo.preprocess_data

    async def preprocess_data(*args, **kwargs):
        try:
            return await preprocess(*args, **kwargs)
        except gr.Error as error:
            if error.print_exception:
                raise user_error(error.message) from None
            raise
        except ComponentProcessingError as error:  # its first line says which input and of which kind
            raise user_error(str(error).partition("\n")[0]) from None

    demo.preprocess_data = preprocess_data  # type: ignore[method-assign]  # on purpose: see the docstring
    return demo


def words_html(words: list[tuple[str, float]]) -> str:
    """The best caption with each word shaded by its probability (0 to 1) and the value written under it."""
    spans = "".join(
        f'<span class="word" title="p = {p:.3f}" style="background: rgba(34, 139, 34, {0.12 + 0.6 * p:.2f})">'
        f'{html.escape(w)}<small>{p:.0%}</small></span>' for w, p in words)
    legend = ('<div class="legend"><span style="background: rgba(34,139,34,0.12)">0%</span>'
              '<span style="background: rgba(34,139,34,0.72)">100%</span> probability of each word</div>')
    return f'<div class="title">Probability of each word</div><div class="words">{spans}</div>{legend}'


def _whole(value, name: str) -> int | None:
    """Sliders send numbers as floats (3.0): accept whole ones as ints; the bounds are the config's."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"{name} must be a whole number, not {str(value)[:20]!r}")


CSS = """
#word-confidence .words { display: flex; flex-wrap: wrap; gap: 6px; font-size: 1.1em; }
#word-confidence .word { display: inline-flex; flex-direction: column; align-items: center; padding: 2px 6px;
                         border-radius: 4px; }
#word-confidence .word small { font-size: 0.7em; opacity: 0.8; }
#word-confidence .legend { margin-top: 6px; font-size: 0.8em; }
#word-confidence .title { font-size: 0.85em; opacity: 0.75; margin-bottom: 4px; }
#word-confidence .legend span { padding: 0 6px; margin-right: 4px; border-radius: 3px; }
#status p { color: #b91c1c; font-weight: 600; }
"""


def _controls(strategy: str):
    """Show only the controls that apply: beam size for beam search, temperature for sampling, and the
    number of captions for both (greedy decoding gives one)."""
    mode = STRATEGY_LABELS.get(strategy, strategy)
    return gr.update(visible=mode == "beam"), gr.update(visible=mode == "sample"), gr.update(visible=mode != "greedy")


def build_demo(model: Captioner, bundled: bool = True, batcher: Batcher | None = None) -> gr.Blocks:
    """The page; ``bundled`` says the model is the bundled one, whose training data and card it names. With a
    ``batcher``, its events run through it, a batch's worth at a time."""
    examples = [str(EXAMPLES_DIR / name) for name in EXAMPLES if (EXAMPLES_DIR / name).is_file()]
    with gr.Blocks(title="captioner", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown("# captioner\nShow-and-Tell image captioning: a CNN encodes the photo, an LSTM writes "
                    "the caption word by word." + ("\n\n" + ABOUT_MODEL if bundled else ""))
        with gr.Row():
            with gr.Column():
                image = original_upload(gr.Image(type="filepath", image_mode=None, label="Photo", height=360,
                                                 sources=["upload", "clipboard", "webcam"]))
                button = gr.Button("Caption", variant="primary")
                with gr.Accordion("Decoding", open=False):
                    strategy = gr.Radio(list(STRATEGY_LABELS), value="Beam search", label="Strategy")
                    beam_size = gr.Slider(1, 10, value=model.generation_config.beam_size, step=1,
                                          label="Beam size (widened to the number of captions)")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.1, label="Temperature", visible=False)
                    num_captions = gr.Slider(1, 5, value=3, step=1, label="Number of captions")
                    max_length = gr.Slider(5, 30, value=model.generation_config.max_length, step=1,
                                           label="Maximum length (words)")
                if examples:
                    gr.Examples(examples, inputs=image, example_labels=[EXAMPLES[Path(p).name] for p in examples],
                                label="Examples (COCO photos, CC BY / CC BY-SA): click one to caption it")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                best = gr.Textbox(label="Caption", elem_id="best-caption", interactive=False, lines=2)
                words = gr.HTML(label="Probability of each word", elem_id="word-confidence")
                nbest = gr.Dataframe(headers=["caption", "share", "per word"], label="All captions, most likely "
                                     "first (share of the list's probability; mean probability per word)",
                                     interactive=False, wrap=True, column_widths=["70%", "15%", "15%"],
                                     elem_id="nbest")
                labels = gr.Label(num_top_classes=TOP_LABELS, label="What the CNN sees (ImageNet labels, "
                                  "not the caption model)", elem_id="cnn-labels")
                timing = gr.Markdown(elem_id="timing", label="timing")
        if bundled and BUNDLED_MODEL_CARD.is_file():
            with gr.Accordion("Model card of the bundled model", open=False):
                gr.Markdown(BUNDLED_MODEL_CARD.read_text(encoding="utf-8"))
        word_data = gr.JSON(visible=False, label="words")
        settings = [strategy, beam_size, temperature, num_captions, max_length]

        def api(image, strategy, beam_size, temperature, num_captions, max_length):
            result = caption_photo(model, image, strategy, beam_size, temperature, num_captions, max_length,
                                   batcher=batcher)
            return (result.best, result.rows, [{"token": w, "probability": round(p, 4)} for w, p in result.words],
                    result.labels, result.timing)

        def page(image, *values):
            """The page's events: errors stay on the page (in red, above the results) instead of a passing toast."""
            if image is None:  # the photo was cleared
                return "", "", "", None, None, ""
            try:
                result = caption_photo(model, image, *values, batcher=batcher)
            except gr.Error as error:
                return f"**{error.message}**", "", "", None, None, ""
            return "", result.best, words_html(result.words), result.rows, result.labels, result.timing

        api_button = gr.Button(visible=False)
        api_button.click(api, [image, *settings], [best, nbest, word_data, labels, timing], api_name="caption")
        page_outputs = [status, best, words, nbest, labels, timing]
        # One click: a new photo (upload, paste, webcam or example) is captioned at once; the button re-runs.
        for event in (button.click, image.change):
            event(page, [image, *settings], page_outputs, api_visibility="private")
        strategy.change(_controls, strategy, [beam_size, temperature, num_captions], api_visibility="private")
    concurrency = CONCURRENCY_LIMIT if batcher is None else batcher.config.max_batch
    demo.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    return quiet_refusals(demo)


def launch(model_dir: str | None = None, host: str | None = None, port: int | None = None,
           device: str = "auto", block: bool = True, engine: str = "auto",
           batching: BatchConfig | None = None) -> gr.Blocks:
    """Load the model once, then serve the demo and, under ``/v1``, the HTTP API (127.0.0.1:7860 unless told
    otherwise), both through one :class:`Batcher` (``batching``: its knobs).

    ``engine="auto"`` serves with ONNX Runtime, the faster engine on a CPU, when onnxruntime is installed and
    the model's export passes its checks: graphs the engine exports itself from the loaded weights at the first
    load, then reads from the per-user cache (``make setup`` exports nothing; see docs/onnx.md).
    """
    torch.set_grad_enabled(False)
    model = Captioner.from_pretrained(model_dir, device=device, engine=engine)
    batcher = Batcher(model, batching)
    demo = build_demo(model, bundled=model_dir is None, batcher=batcher)
    demo.launch(server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(port or os.environ.get("GRADIO_SERVER_PORT", "7860")), share=False,
                max_file_size=MAX_BODY_BYTES, show_error=True, theme=THEME, css=CSS, ssr_mode=False,
                footer_links=["api"], allowed_paths=[str(EXAMPLES_DIR)], prevent_thread_lock=not block,
                app_kwargs={"lifespan": mounted_beside(batcher, model_dir)})
    return demo
