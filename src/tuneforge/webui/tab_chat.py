"""Chat tab: talk to a run or a model with streaming answers; side by side, the same prompt answered by the run's
base model (the same weights with the adapter switched off, for LoRA runs)."""

from __future__ import annotations

import gradio as gr

from tuneforge.webui.context import Context, message
from tuneforge.webui.texts import text


class ChatTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def build(self) -> None:
        from tuneforge.model.embedded import embedded_models

        ctx, T = self.ctx, self.ctx.texts
        choices = ctx.workspace.finished_runs() + list(embedded_models())
        with gr.Row():
            self.target = T.add(gr.Dropdown(choices, value=choices[0] if choices else None, allow_custom_value=True,
                                            label=T.initial("chat_target"), info=T.initial("chat_target_info"),
                                            scale=2), label="chat_target", info="chat_target_info")
            self.system = T.add(gr.Textbox("", label=T.initial("system_prompt"), info=T.initial("system_prompt_info"),
                                           scale=2), label="system_prompt", info="system_prompt_info")
        with gr.Row():
            self.temperature = T.add(gr.Slider(0, 2, value=0, step=0.05, label=T.initial("temperature")),
                                     label="temperature")
            self.top_p = T.add(gr.Slider(0.05, 1, value=1, step=0.05, label=T.initial("top_p")), label="top_p")
            self.max_tokens = T.add(gr.Slider(8, 1024, value=256, step=8, label=T.initial("max_new_tokens")),
                                    label="max_new_tokens")
            self.side = T.add(gr.Checkbox(False, label=T.initial("side_by_side"), info=T.initial("side_by_side_info")),
                              label="side_by_side", info="side_by_side_info")
        with gr.Row():
            self.tuned = T.add(gr.Chatbot(label=T.initial("chat_tuned"), height=380), label="chat_tuned")
            self.base = T.add(gr.Chatbot(label=T.initial("chat_base"), height=380, visible=False), label="chat_base")
        with gr.Row():
            self.prompt = T.add(gr.Textbox(label=T.initial("your_message"), scale=4), label="your_message")
            send = T.add(gr.Button(T.initial("send"), variant="primary"), value="send")
            stop = T.add(gr.Button(T.initial("stop_answer")), value="stop_answer")
            clear = T.add(gr.Button(T.initial("clear")), value="clear")
        self.status = gr.Markdown()
        inputs = [ctx.lang, self.target, self.system, self.temperature, self.top_p, self.max_tokens, self.side,
                  self.prompt, self.tuned, self.base]
        outputs = [self.tuned, self.base, self.prompt, self.status]
        answering = send.click(self.on_send, inputs, outputs)
        submitting = self.prompt.submit(self.on_send, inputs, outputs)
        stop.click(None, None, None, cancels=[answering, submitting])
        clear.click(lambda: ([], [], ""), None, [self.tuned, self.base, self.status])
        self.side.change(lambda on: gr.update(visible=on), self.side, self.base)
        self.target.change(lambda: ([], []), None, [self.tuned, self.base])

    def on_send(self, lang, target, system, temperature, top_p, max_tokens, side, prompt, tuned, base):
        from tuneforge.infer.engine import GenerationSettings

        tuned, base = list(tuned or []), list(base or [])
        if not (prompt or "").strip():
            yield tuned, base, prompt, text("empty_message", lang)
            return
        try:
            engine = self.ctx.engine(self.ctx.target(target))
            settings = GenerationSettings(max_new_tokens=int(max_tokens), temperature=float(temperature),
                                          top_p=float(top_p))
        except Exception as error:
            yield tuned, base, prompt, message(error, lang)
            return
        system_turn = [{"role": "system", "content": system}] if (system or "").strip() else []
        tuned.append({"role": "user", "content": prompt})
        tuned.append({"role": "assistant", "content": ""})
        for piece in engine.stream_chat(system_turn + tuned[:-1], settings):
            tuned[-1]["content"] += piece
            yield tuned, base, "", ""
        if side:
            yield from self._base_answer(engine, target, system_turn, prompt, settings, tuned, base, lang)

    def _base_answer(self, engine, target, system_turn, prompt, settings, tuned, base, lang):
        """The base model answers the same: a LoRA run's own weights with the adapter off, or the base model a full
        run started from (with the run's template and system prompt)."""
        from tuneforge.model.runs import run_base_model
        from tuneforge.rundir import META, open_run

        base.append({"role": "user", "content": prompt})
        base.append({"role": "assistant", "content": ""})
        folder = self.ctx.workspace.root / target
        if hasattr(engine.model, "disable_adapter"):
            plain = engine.without_adapter()
        elif (folder / META).is_file():
            loaded = self.ctx.engine(run_base_model(open_run(folder)))
            plain = engine.__class__(loaded.model, engine.tokenizer, engine.stop, "base model", engine.default_system)
        else:
            base[-1]["content"] = text("no_base_for_model", lang)
            yield tuned, base, "", ""
            return
        with plain.active():
            for piece in plain.stream_chat(system_turn + base[:-1], settings):
                base[-1]["content"] += piece
                yield tuned, base, "", ""
