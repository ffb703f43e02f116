"""The OpenAI-compatible API server (`tuneforge api`)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import ConfigError


def load_target(target: str, template: str = "auto", backend: str = "hf", adapters: list[str] = ()):
    """The Engine (or, for a reward-model run, the RewardModel) a server answers with."""
    from tuneforge.rundir import META, open_run

    if (Path(target) / META).is_file() and open_run(target).meta().get("stage") == "rm":
        if backend != "hf":
            raise ConfigError("--backend vllm serves chat models; a reward-model run is served with --backend hf")
        from tuneforge.model.reward import RewardModel

        return RewardModel.from_run(target)
    from tuneforge.infer.engine import Engine

    return Engine.load(target, template=template, backend=backend, adapters=adapters)


def serve(target: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          backend: str = "hf", max_batch: int = 8, max_queue: int = 64, model_name: str | None = None,
          template: str = "auto", max_body: int | None = None, adapters: list[str] = ()) -> None:
    """Load TARGET (a run directory or a model) and serve it until interrupted."""
    import uvicorn

    from tuneforge.serve.server import DEFAULT_MAX_BODY, ServerSettings, create_app
    from tuneforge.ports import port_is_free

    if not port_is_free(host, port):
        raise ConfigError(f"--port {port}: something is already listening on {host}:{port}. hint: give another "
                          "--port, or stop what runs there")
    engine = load_target(target, template, backend, adapters)
    name = model_name or Path(str(target).rstrip("/")).name or str(target)
    settings = ServerSettings(name, api_key or None, max_body or DEFAULT_MAX_BODY, max_batch, max_queue)
    app = create_app(engine, settings)
    print(f"tuneforge: serving {name} ({engine.description}) at http://{host}:{port}/v1"
          + (" (API key required)" if api_key else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
