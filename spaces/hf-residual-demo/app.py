"""hf-residual Space: chat with base, instruct and ported models side by side, see their results, port.

Run locally with ``python app.py`` (CPU, no network: the demo's tiny family is trained on first start, in the
background while the page is served, which shows and logs it), or set ``HF_RESIDUAL_SPACE_MODELS`` to a
YAML/JSON file of ``name: folder-or-repo-id`` (or to a folder written by ``hf-residual demo``) to show other
models. The page logic is here; models, generation, results and porting are in ``residual_space.py``.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradio as gr  # noqa: E402
import residual_space as rs  # noqa: E402

from hf_residual.errors import ResidualError  # noqa: E402

SLOTS = 3
NONE = "(none)"  # a slot left empty, to compare two models
HEADER = """# hf-residual: instruction residuals, side by side
The same prompt goes to every picked model at once; each reply streams into its own panel, labelled with the
model's name and role. A **ported** model is a continually pre-trained (CPT'd) base plus the instruction
residual `R = instruct - base` (Jindal et al. 2024). Port your own pair in the **Port** tab."""
TOY_NOTE = """*These are the offline toy models (random weights): replies are gibberish and show the plumbing only.
Point `HF_RESIDUAL_SPACE_MODELS` at the models of `hf-residual demo` for models that really follow instructions.*"""
EMPTY_RESULTS = """### No results yet
Nothing to compare: the Space config lists no results file and no shown model has evaluation results in its card.
Run `hf-residual demo -o hf-residual-demo` and start the Space with `HF_RESIDUAL_SPACE_MODELS=hf-residual-demo`,
or add `results: [path/to/results.json]` to the Space config."""


NOT_READY = "### The models are not ready yet\n"


def _track_tqdm() -> gr.Progress:
    """The Port tab's progress: tqdm bars (``api.port`` draws one) shown on the page.

    ``gr.Progress(track_tqdm=True)`` patches tqdm's methods for the whole process, and gradio's patched
    ``close`` reads an attribute that only bars created after the patch have: a bar created before (earlier
    in the process, or by the start-up thread training the tiny family) raises ``AttributeError: 'tqdm'
    object has no attribute '_progress'`` when closed or garbage-collected. So the patch is made once, here,
    at import (before any start-up thread), and a class default leaves such bars untracked instead.
    """
    progress = gr.Progress(track_tqdm=True)
    import tqdm

    if not hasattr(tqdm.tqdm, "_progress"):
        tqdm.tqdm._progress = None
    return progress


PORT_PROGRESS = _track_tqdm()
_SERVED: list[Path] = []


def served(path: Path) -> str:
    """A copy of ``path`` that gradio may serve, for an image the page shows.

    gradio serves files under the working directory, the temp directory and ``allowed_paths`` only, while
    results and the default tiny family live in ``~/.cache`` (or anywhere a config file says): the image is
    copied to a temporary folder of this process (by content, so a refresh copies nothing), whatever the
    ``launch()`` arguments (the Hub's Spaces, ``python app.py``, tests).
    """
    path = Path(path)
    if not _SERVED:
        _SERVED.append(Path(tempfile.mkdtemp(prefix="hf-residual-space-")))
        atexit.register(shutil.rmtree, _SERVED[0], True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    copy = _SERVED[0] / digest / path.name
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    return str(copy)


def _label(store: rs.ModelStore | None, name: str | None) -> str:
    if not name or name == NONE or store is None:
        return "(no model)"
    entry = store.entry(name)
    return f"{entry.label} · {rs.template_note(entry)}"


def _quiet_gradio_queue_statistics() -> None:
    """Ignore the pandas deprecation warnings (Pandas4Warning: ``future.no_silent_downcasting``, ``copy=``)
    of gradio's own queue statistics, computed in gradio/queueing.py after every event: they are gradio's
    to fix and a user of the Space cannot act on them. Only that module's DeprecationWarnings."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"gradio\.queueing")


def build_app(config: rs.SpaceConfig | None = None) -> gr.Blocks:
    """The whole page; ``config`` defaults to ``$HF_RESIDUAL_SPACE_MODELS`` or the demo's tiny family.

    The tiny family is prepared in the background (trained on the first start): the page is served at
    once, says so in its status line and in the console, and fills the model pickers when it is ready.
    """
    _quiet_gradio_queue_statistics()
    if config is None and os.environ.get(rs.CONFIG_ENV):
        config = rs.load_config()  # a bad config file fails the start, with its message
    startup = rs.Startup(config) if config is not None else rs.Startup().start()
    names = startup.store.names() if startup.ready else []
    ready_at_build = bool(names)
    defaults = _defaults(startup)
    is_toy = bool(config and config.models) and all("/toy/" in e.ref for e in config.models.values())

    def check(name: str | None) -> str | None:
        if not name or name == NONE:
            return None
        if not startup.ready:
            raise gr.Error(startup.status().replace("**", ""))
        try:
            startup.store.entry(name)
        except ResidualError as error:
            raise gr.Error(str(error)) from error
        return name

    def chat(prompt, m1, m2, m3, histories, max_new_tokens, temperature, top_p, seed):
        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt first.")
        picked = [check(m) for m in (m1, m2, m3)]
        if not any(picked):
            raise gr.Error("Pick at least one model.")
        histories = [list(h) for h in histories]
        turn = {"role": "user", "content": prompt}
        conversations = [h + [turn] if n else None for h, n in zip(histories, picked, strict=True)]
        sampling = rs.Sampling(int(max_new_tokens), float(temperature), float(top_p), int(seed))
        shown = histories
        for texts in rs.stream_side_by_side(startup.store, conversations, picked, sampling):
            shown = [
                c + [{"role": "assistant", "content": t}] if c is not None else h
                for c, t, h in zip(conversations, texts, histories, strict=True)
            ]
            yield (*shown, shown, "")

    def pick(slot: int):
        def on_pick(name, histories):
            histories = [list(h) for h in histories]
            histories[slot] = []
            return gr.Chatbot(value=[], label=_label(startup.store, check(name))), histories

        return on_pick

    def clear():
        return (*([[]] * SLOTS), [[] for _ in range(SLOTS)])

    def results():
        if not startup.ready:
            note = NOT_READY + startup.status()
            return gr.Markdown(note), gr.Dataframe(visible=False), gr.Image(visible=False)
        found = rs.load_results(startup.config, startup.store)
        if not found.rows and not found.images:
            return gr.Markdown(EMPTY_RESULTS), gr.Dataframe(visible=False), gr.Image(visible=False)
        images = list(found.images)
        if found.rows and not images:
            plot = rs.plot_rows(found.rows, startup.config.workdir / "results-plot.png")
            images += [plot] if plot else []
        import pandas as pd

        table = pd.DataFrame(found.rows) if found.rows else pd.DataFrame()
        note = "Read from: " + ", ".join(f"`{s}`" for s in found.sources)
        if len(images) > 1:
            note += ". More plots: " + ", ".join(f"`{p}`" for p in images[1:])
        return (
            gr.Markdown(note),
            gr.Dataframe(value=table, visible=bool(found.rows)),
            gr.Image(value=served(images[0]) if images else None, visible=bool(images)),
        )

    def port(instruct, base, target, alpha, progress=PORT_PROGRESS):
        if not (instruct and base and target):
            raise gr.Error("Pick an instruct model, its base and a target.")
        picked = check(instruct), check(base), check(target)
        progress(0, desc="porting")
        try:
            entry = rs.run_port(startup.store, *picked, float(alpha))
        except ResidualError as error:
            raise gr.Error(str(error)) from error
        all_names = [*startup.store.names(), NONE]
        message = (
            f"Ported **{entry.name}**: {entry.role}. Saved in `{entry.ref}`. "
            "It is now model 3 in the **Chat side by side** tab."
        )
        return (
            message,
            gr.Dropdown(choices=all_names),
            gr.Dropdown(choices=all_names),
            gr.Dropdown(choices=all_names, value=entry.name),
            gr.Tabs(selected="chat"),
        )

    def sync():
        """On page load, and every second while the models are prepared: the status line, the pickers
        (with the models ported since), the Port tab's picks and the results; then the timer stops.

        Values are set only when the models became ready after the page was built; otherwise only the
        choices are refreshed, so that a pick made before this first call returns is not overwritten."""
        if not startup.ready:
            keep = [gr.skip()] * (SLOTS + 3)
            return (startup.status(), gr.Timer(active=not startup.done), *keep, *results())
        current = startup.store.names()
        if ready_at_build:  # the page was built with its picks: a user's pick made meanwhile stays
            picks = [gr.Dropdown(choices=[*current, NONE]) for _ in range(SLOTS)]
            roles = [gr.Dropdown(choices=current) for _ in range(3)]
        else:
            picks = [gr.Dropdown(choices=[*current, NONE], value=d or NONE) for d in _defaults(startup)]
            roles = [gr.Dropdown(choices=current, value=g) for g in rs.guess_port_roles(current)]
        return (startup.status(), gr.Timer(active=False), *picks, *roles, *results())

    with gr.Blocks(title="hf-residual: instruction residuals side by side") as demo:
        gr.Markdown(HEADER + ("\n\n" + TOY_NOTE if is_toy else ""))
        status = gr.Markdown(startup.status(), elem_id="status")
        timer = gr.Timer(1.0, active=not startup.ready)
        with gr.Tabs() as tabs:
            with gr.Tab("Chat side by side", id="chat"):
                with gr.Row():
                    pickers = [
                        gr.Dropdown(
                            choices=[*names, NONE],
                            value=defaults[i] or NONE,
                            label=f"Model {i + 1}",
                            allow_custom_value=True,
                            elem_id=f"model-{i + 1}",
                        )
                        for i in range(SLOTS)
                    ]
                with gr.Row():
                    chatbots = [
                        gr.Chatbot(
                            label=_label(startup.store, defaults[i]), height=360, elem_id=f"chat-{i + 1}"
                        )
                        for i in range(SLOTS)
                    ]
                histories = gr.State([[] for _ in range(SLOTS)])
                with gr.Row():
                    prompt = gr.Textbox(
                        label="Prompt (sent to every model, each with its own chat template)",
                        placeholder="Answer in upper case: what is the capital of Zorvania?",
                        scale=5,
                        elem_id="prompt",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    clear_button = gr.Button("Clear", scale=1)
                with gr.Accordion("Sampling settings", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=48, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p (when sampling)")
                    seed = gr.Number(value=0, precision=0, label="seed")
                chat_inputs = [prompt, *pickers, histories, max_new_tokens, temperature, top_p, seed]
                chat_outputs = [*chatbots, histories, prompt]
                send.click(chat, chat_inputs, chat_outputs, api_name="chat", concurrency_limit=2)
                prompt.submit(chat, chat_inputs, chat_outputs, api_name=False, concurrency_limit=2)
                clear_button.click(clear, None, [*chatbots, histories], api_name="clear")
                for i, picker in enumerate(pickers):
                    picker.change(pick(i), [picker, histories], [chatbots[i], histories], api_name=False)

            with gr.Tab("Results", id="results"):
                results_note = gr.Markdown()
                results_table = gr.Dataframe(visible=False, interactive=False, label="comparison")
                results_plots = gr.Image(
                    visible=False, label="plot", type="filepath", interactive=False, elem_id="results-plot"
                )
                refresh = gr.Button("Refresh")
                refresh.click(results, None, [results_note, results_table, results_plots], api_name="results")

            with gr.Tab("Port", id="port"):
                gr.Markdown(
                    "Port the instruction residual of an instruct model onto a target (a CPT'd version of its "
                    "base): `output = target + alpha * (instruct - base)`. Small models only: it runs here, on CPU."
                )
                guess = rs.guess_port_roles(names)
                with gr.Row():
                    port_instruct = gr.Dropdown(choices=names, value=guess[0], label="instruct model")
                    port_base = gr.Dropdown(choices=names, value=guess[1], label="its base")
                    port_target = gr.Dropdown(choices=names, value=guess[2], label="target (CPT'd base)")
                alpha = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="alpha (scale of the residual)")
                port_button = gr.Button("Port", variant="primary")
                port_status = gr.Markdown()
                port_button.click(
                    port,
                    [port_instruct, port_base, port_target, alpha],
                    [port_status, *pickers, tabs],
                    api_name="port",
                    concurrency_limit=1,
                )

        synced = [status, timer, *pickers, port_instruct, port_base, port_target]
        synced += [results_note, results_table, results_plots]
        demo.load(sync, None, synced, api_name=False)
        timer.tick(sync, None, synced, api_name=False, show_progress="hidden")
    demo.queue(max_size=32, default_concurrency_limit=2)
    return demo


def _defaults(startup: rs.Startup) -> list[str | None]:
    """The models shown first in the chat slots (none until the models are ready)."""
    chosen = startup.config.chat_defaults if startup.ready else []
    return (chosen + [None] * SLOTS)[:SLOTS]


if __name__ == "__main__":
    build_app().launch(ssr_mode=False)
