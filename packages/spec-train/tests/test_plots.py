"""The charts show the data: one curve per series that has data, in matplotlib's default colours."""

import json

from spec_train.evaluate import acceptance_figure
from spec_train.metrics import plot


def _records(k: int, with_val: bool):
    for step in range(1, 9):
        yield {"split": "train", "step": step, "loss": 3.0 / step}
        if step % 4 == 0:
            ev = {"step": step, "loss": 2.0 / step, "acceptance": [0.5 + 0.01 * step - 0.1 * j for j in range(k)],
                  "acceptance_length": 1.5 + 0.01 * step}  # fmt: skip
            yield {"split": "train_eval", **ev}
            if with_val:
                yield {"split": "val", **ev}


def test_training_charts_draw_each_logged_series(tmp_path, series):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(3, True)))
    plot(tmp_path)
    assert series(tmp_path / "loss.png") == [0, 1]  # train, validation
    assert series(tmp_path / "acceptance.png") == [0, 1, 2]  # one curve per draft position
    # Without validation the acceptance comes from the training sample, and the loss chart has one curve.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(2, False)))
    plot(tmp_path)
    assert series(tmp_path / "loss.png") == [0]
    assert series(tmp_path / "acceptance.png") == [0, 1]


def test_eval_chart_has_one_line_per_method(tmp_path, series):
    acceptance_figure({"draft": [0.6, 0.4, 0.2], "ngram": [0.3, 0.1, 0.05]}, "t").savefig(tmp_path / "a.png")
    assert series(tmp_path / "a.png") == [0, 1]
    acceptance_figure({"draft": [0.6, 0.4, 0.2], "ngram": []}, "t").savefig(
        tmp_path / "b.png"
    )  # n-gram never proposed
    assert series(tmp_path / "b.png") == [0]


def test_eval_writes_the_acceptance_by_context_chart(tmp_path, series):
    import msgspec

    from spec_train.buckets import by_round
    from spec_train.evaluate import write_report

    buckets = by_round([50, 60, 300, 310, 700], [2, 3, 1, 1, 0], 3)
    assert [(b.lo, b.hi, b.drafts) for b in buckets] == [(0, 128, 2), (256, 512, 2), (512, 1024, 1)]
    assert [b.mean_acceptance_length for b in buckets] == [3.5, 2.0, 1.0]
    result = {"offline": True, "k": 3, "draft": {"acceptance_per_position": [0.8, 0.5, 0.2]},
              "acceptance_by_context": msgspec.to_builtins(buckets)}  # fmt: skip
    write_report(result, tmp_path, "t")
    assert json.loads((tmp_path / "eval.json").read_text())["acceptance_by_context"][1]["lo"] == 256
    assert series(tmp_path / "acceptance_by_context.png") == [0]
