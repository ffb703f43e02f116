"""`tuneforge api` refuses what it cannot do before loading anything."""

from __future__ import annotations

import socket

from tuneforge.cli import main


def test_api_refuses_a_port_in_use_a_missing_model_and_a_bad_body_limit(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["api", str(tmp_path), "--port", str(port)]) == 2
    assert f"--port {port}: something is already listening" in capsys.readouterr().err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert main(["api", str(tmp_path / "no-such-run"), "--port", str(free)]) == 2
    err = capsys.readouterr().err
    assert "no-such-run" in err and "Traceback" not in err
    assert main(["api", str(tmp_path), "--max-body-mb", "0"]) == 2
    assert "--max-body-mb 0" in capsys.readouterr().err
