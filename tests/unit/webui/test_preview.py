"""The data preview marks exactly the tokens training puts in the loss."""

from tests.conftest import REPO
from tuneforge.config import load_config
from tuneforge.webui.preview import TRAINED, preview_rows


def test_preview_marks_the_answers_and_their_end_of_turn(tiny_model_dir):
    cfg = load_config({"model": {"name_or_path": str(tiny_model_dir)},
                       "data": {"dataset": "identity", "dataset_dir": str(REPO / "data"),
                                "placeholders": {"name": "Tiny", "author": "Tests"}, "default_system": "Be brief."}})
    pieces = preview_rows(cfg, "identity", rows=2)
    trained = [text for text, kind in pieces if kind == TRAINED]
    assert len(trained) == 2 and all(t.endswith("<|im_end|>\n") for t in trained)
    assert "Tiny" in trained[0]  # the placeholder is filled as in training
    masked = "".join(text for text, kind in pieces if kind != TRAINED)
    assert masked.count("<|im_start|>user") == 2 and masked.rstrip().endswith("<|im_start|>assistant")
    assert masked.count("<|im_start|>system\nBe brief.<|im_end|>") == 2  # the system prompt training uses
    everything = load_config(cfg, ["data.train_on_prompt=true"])
    assert all(kind == TRAINED for text, kind in preview_rows(everything, "identity", rows=1))
