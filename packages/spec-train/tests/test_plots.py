"""The charts show the data: one curve per series that has data, in matplotlib's default colours, each
in its own style, at integer positions and steps, labelled with what its rates are over."""

import json

from spec_train.evaluate import acceptance_figure, acceptance_series
from spec_train.metrics import figures, plot


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


def drawn(ax) -> list[tuple]:
    """(label, x, y, (dash, marker)) of each line the axes draw, read back from matplotlib."""
    return [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()),
             (line.get_linestyle(), line.get_marker())) for line in ax.get_lines()]  # fmt: skip


def test_eval_acceptance_chart_says_what_each_line_is_over_and_keeps_equal_lines_apart():
    # k = 2, 3, 4 with equal rates where they overlap (the lines lie on one another); n-gram drafted on
    # 12.3% of the steps only.
    rates = [0.6, 0.4, 0.2, 0.1]
    report = {"per_k": [{"k": k, "acceptance_per_position": rates[:k]} for k in (2, 3, 4)],
              "ngram": {"k": 3, "drafted_share": 0.123, "acceptance_per_position": [0.5, 0.3, 0.2]}}  # fmt: skip
    fig = acceptance_figure(acceptance_series(report), "t")
    ax = fig.axes[0]
    lines = drawn(ax)
    assert [x[0] for x in lines] == ["draft, k=2", "draft, k=3", "draft, k=4",
                                     "n-gram, k=3 (drafted on 12% of steps, rates over those steps)"]  # fmt: skip
    assert [(x, y) for _, x, y, _ in lines] == [([1, 2], rates[:2]), ([1, 2, 3], rates[:3]), ([1, 2, 3, 4], rates),
                                                ([1, 2, 3], [0.5, 0.3, 0.2])]  # fmt: skip
    assert len({style for *_, style in lines}) == 4  # each line its own dash and marker
    assert list(ax.get_xticks()) == [1, 2, 3, 4]  # draft positions: no tick at 1.5
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [x[0] for x in lines]
    # A method that never drafted is named, not silently left out; an offline report has one line.
    fig = acceptance_figure({"draft, k=3": rates[:3], "n-gram, k=3 (drafted on 0% of steps)": []}, "t")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][
        1
    ] == "n-gram, k=3 (drafted on 0% of steps): no drafts"
    assert [x[1] for x in drawn(fig.axes[0])] == [[1, 2, 3], []]
    assert acceptance_series({"offline": True, "draft": {"acceptance_per_position": rates}}) == {
        "draft (offline)": rates
    }


def test_training_charts_tick_whole_steps_and_keep_positions_apart():
    records = list(_records(3, True))
    figs = figures(records)
    loss, (per_position, length) = figs["loss.png"].axes[0], figs["acceptance.png"].axes
    for ax in (loss, per_position, length):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(t == int(t) for t in ticks), ticks
    lines = drawn(per_position)
    assert [x[0] for x in lines] == ["position 1", "position 2", "position 3"]
    assert all(x == [4, 8] for _, x, _, _ in lines) and len({style for *_, style in lines}) == 3
    val = [r for r in records if r["split"] == "val"]
    assert lines[2][2] == [r["acceptance"][2] for r in val]
    assert drawn(length)[0][2] == [r["acceptance_length"] for r in val]
    assert [x[0] for x in drawn(loss)] == ["train", "validation"]


def test_speed_chart_ticks_every_k_it_draws():
    from spec_train.evaluate import speed_figure

    def at(tps):
        return {"1": {"tokens_per_second": tps, "tokens_per_second_spread": 1.0}}

    report = {"per_k": [{"k": 2, "per_concurrency": at(50.0)}, {"k": 3, "per_concurrency": at(55.0)}],
              "ngram": {"k": 4, "runs": [{"concurrency": 1, "tokens_per_second": 40.0}]},
              "baseline": {"runs": [{"concurrency": 1, "tokens_per_second": 30.0}]}}  # fmt: skip
    ax = speed_figure(report, "t").axes[0]
    assert list(ax.get_xticks()) == [2, 3, 4]  # n-gram's k = 4 beside the draft's 2 and 3
    assert [x[:3] for x in drawn(ax)] == [("draft, concurrency 1", [2, 3], [50.0, 55.0]),
                                          ("target alone, concurrency 1", [2, 3], [30.0, 30.0]),
                                          ("n-gram, concurrency 1", [4], [40.0])]  # fmt: skip


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
