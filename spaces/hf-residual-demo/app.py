"""hf-residual Space: chat with base, instruct and ported models side by side, see their results, port.

Run locally with ``python app.py`` (CPU, no network: the demo's tiny family is trained on first start), or set
``HF_RESIDUAL_SPACE_MODELS`` to a YAML/JSON file of ``name: folder-or-repo-id`` (or to a folder written
by ``hf-residual demo``) to show other models. The page logic is here; models, generation, results and
porting are in ``residual_space.py``.
"""

from __future__ import annotations

import sys
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


def _label(store: rs.ModelStore, name: str | None) -> str:
    if not name or name == NONE:
        return "(no model)"
    entry = store.entry(name)
    return f"{entry.label} · {rs.template_note(entry)}"


def build_app(config: rs.SpaceConfig | None = None) -> gr.Blocks:
    """The whole page; ``config`` defaults to ``$HF_RESIDUAL_SPACE_MODELS`` or the demo's tiny family."""
    config = config or rs.load_config()
    store = rs.ModelStore(config)
    names = store.names()
    defaults = (config.chat_defaults + [None] * SLOTS)[:SLOTS]
    is_toy = all("/toy/" in e.ref for e in config.models.values())

    def check(name: str | None) -> str | None:
        if not name or name == NONE:
            return None
        try:
            store.entry(name)
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
        for texts in rs.stream_side_by_side(store, conversations, picked, sampling):
            shown = [
                c + [{"role": "assistant", "content": t}] if c is not None else h
                for c, t, h in zip(conversations, texts, histories, strict=True)
            ]
            yield (*shown, shown, "")

    def pick(slot: int):
        def on_pick(name, histories):
            histories = [list(h) for h in histories]
            histories[slot] = []
            return gr.Chatbot(value=[], label=_label(store, check(name))), histories

        return on_pick

    def clear():
        return (*([[]] * SLOTS), [[] for _ in range(SLOTS)])

    def results():
        found = rs.load_results(config, store)
        if not found.rows and not found.images:
            return gr.Markdown(EMPTY_RESULTS), gr.Dataframe(visible=False), gr.Image(visible=False)
        images = list(found.images)
        if found.rows and not images:
            plot = rs.plot_rows(found.rows, config.workdir / "results-plot.png")
            images += [plot] if plot else []
        import pandas as pd

        table = pd.DataFrame(found.rows) if found.rows else pd.DataFrame()
        note = "Read from: " + ", ".join(f"`{s}`" for s in found.sources)
        if len(images) > 1:
            note += ". More plots: " + ", ".join(f"`{p}`" for p in images[1:])
        return (
            gr.Markdown(note),
            gr.Dataframe(value=table, visible=bool(found.rows)),
            gr.Image(value=str(images[0]) if images else None, visible=bool(images)),
        )

    def port(instruct, base, target, alpha, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio API)
        if not (instruct and base and target):
            raise gr.Error("Pick an instruct model, its base and a target.")
        progress(0, desc="porting")
        try:
            entry = rs.run_port(store, check(instruct), check(base), check(target), float(alpha))
        except ResidualError as error:
            raise gr.Error(str(error)) from error
        all_names = [*store.names(), NONE]
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

    def refresh_choices():
        current = [*store.names(), NONE]
        return [gr.Dropdown(choices=current) for _ in range(SLOTS)]

    with gr.Blocks(title="hf-residual: instruction residuals side by side") as demo:
        gr.Markdown(HEADER + ("\n\n" + TOY_NOTE if is_toy else ""))
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
                        gr.Chatbot(label=_label(store, defaults[i]), height=360, elem_id=f"chat-{i + 1}")
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
                results_plots = gr.Image(visible=False, label="plot", type="filepath", interactive=False)
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

        demo.load(results, None, [results_note, results_table, results_plots], api_name=False)
        demo.load(refresh_choices, None, pickers, api_name=False)
    demo.queue(max_size=32, default_concurrency_limit=2)
    return demo


if __name__ == "__main__":
    build_app().launch(ssr_mode=False)
