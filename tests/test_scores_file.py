"""The scores file: round trip, ranking and tie-breaks, selection by ratio/keep, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dptool.errors import InputError
from dptool.scores import (
    Scores,
    assignment_path,
    fingerprint_file,
    load_assignment,
    rank_groups,
    read_scores,
    score_summary,
    select_groups,
    write_scores,
)

SOURCE = {"path": "/data/src.beton", "fingerprint": "blake2b:abc", "num_samples": 12, "num_classes": 5}


def class_scores(scores=(3, 0, 5, 0, 1), tiebreak=(0.1, 0.4, 0.0, 0.2, 0.0), **kw) -> Scores:
    n = len(scores)
    return Scores(method="lm", level="class", ids=np.arange(n), names=[f"c{i}" for i in range(n)],
                  scores=np.asarray(scores, float), tiebreak=np.asarray(tiebreak, float),
                  source={**SOURCE, "num_classes": n}, tie_break="summed softmax, then class id", **kw)


def cluster_scores(k=4) -> Scores:
    return Scores(method="fm", level="cluster", ids=np.arange(k), names=[f"cluster {i}" for i in range(k)],
                  scores=np.arange(k, dtype=float)[::-1].copy(), tiebreak=np.zeros(k), source=SOURCE,
                  tie_break="cluster id", params={"k": k})


def test_rank_groups_orders_by_score_then_tiebreak_then_id():
    scores = np.array([1.0, 3.0, 1.0, 1.0, 0.0, 3.0])
    tiebreak = np.array([0.5, 0.0, 0.5, 0.9, 9.0, 0.0])
    ranks = rank_groups(scores, tiebreak)
    # order: 1 (3, 0, id 1), 5 (3, 0, id 5), 3 (1, .9), 0 (1, .5, id 0), 2 (1, .5, id 2), 4
    assert np.argsort(ranks).tolist() == [1, 5, 3, 0, 2, 4]
    assert ranks.dtype == np.int64


def test_rank_groups_uses_ids_as_last_key():
    ranks = rank_groups(np.zeros(3), np.zeros(3), ids=np.array([7, 2, 5]))
    assert ranks.tolist() == [2, 0, 1]


def test_rank_groups_refuses_nan():
    with pytest.raises(InputError, match="finite"):
        rank_groups(np.array([1.0, np.nan]), np.zeros(2))


def test_round_trip(tmp_path):
    s = class_scores(params={"batch": 64}, surrogate={"arch": "resnet18", "fingerprint": "x"},
                     target={"path": "t.beton", "fingerprint": "y", "num_samples": 9}, extra={"hist": [[1, 2]]})
    path = write_scores(tmp_path / "scores.json", s)
    back = read_scores(path)
    for name in ("ids", "scores", "tiebreak", "ranks"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))
    assert back.names == s.names and back.params == {"batch": 64} and back.extra == {"hist": [[1, 2]]}
    assert back.surrogate["arch"] == "resnet18" and back.target["num_samples"] == 9
    assert back.method == "lm" and back.level == "class" and back.assignment is None and back.created
    doc = json.loads(path.read_text())
    assert doc["format"] == "dptool-scores" and doc["version"] == 1
    assert {"id", "name", "score", "tiebreak", "rank"} == set(doc["groups"][0])
    assert fingerprint_file(path).startswith("sha256:") and fingerprint_file(path) == fingerprint_file(path)


def test_arrays_are_read_only():
    s = class_scores()
    with pytest.raises(ValueError):
        s.scores[0] = 1.0


def test_assignment_round_trip(tmp_path):
    s = cluster_scores()
    assign = np.array([0, 1, 2, 3] * 3, dtype=np.int64)
    path = write_scores(tmp_path / "fm.json", s, assignment=assign)
    assert assignment_path(path) == tmp_path / "fm.assign.npy" and (tmp_path / "fm.assign.npy").exists()
    back = read_scores(path)
    assert back.assignment == "fm.assign.npy"
    a = load_assignment(path, back)
    assert a.dtype == np.int32 and a.tolist() == assign.tolist()


def test_assignment_checks(tmp_path):
    s = cluster_scores()
    with pytest.raises(InputError, match="need the per-sample"):
        write_scores(tmp_path / "a.json", s)
    with pytest.raises(InputError, match="one cluster id per source sample"):
        write_scores(tmp_path / "a.json", s, assignment=np.zeros(5, int))
    with pytest.raises(InputError, match="cluster id 9"):
        write_scores(tmp_path / "a.json", s, assignment=np.full(12, 9))
    with pytest.raises(InputError, match="class-level scores take no assignment"):
        write_scores(tmp_path / "a.json", class_scores(), assignment=np.zeros(12, int))
    assert not (tmp_path / "a.json").exists()
    path = write_scores(tmp_path / "b.json", s, assignment=np.zeros(12, int))
    (tmp_path / "b.assign.npy").unlink()
    with pytest.raises(InputError, match=r"b.assign.npy, but \S*b.assign.npy does not exist"):
        load_assignment(path, read_scores(path))


def test_a_replaced_assignment_is_refused_and_never_overwritten_without_force(tmp_path):
    """The scores file records its assignment's sha256: a later run that rewrote <stem>.assign.npy (scores moved
    away first) would otherwise prune by clusters the scores were not computed for."""
    s = cluster_scores()
    first = write_scores(tmp_path / "fm.json", s, assignment=np.array([0, 1, 2, 3] * 3))
    moved = first.rename(tmp_path / "fm_moved.json")
    with pytest.raises(InputError, match=r"fm\.assign\.npy already exists; pass --force"):
        write_scores(tmp_path / "fm.json", s, assignment=np.array([3, 2, 1, 0] * 3))
    assert load_assignment(moved, read_scores(moved)).tolist() == [0, 1, 2, 3] * 3
    write_scores(tmp_path / "fm.json", s, assignment=np.array([3, 2, 1, 0] * 3), force=True)
    with pytest.raises(InputError, match=r"fm\.assign\.npy is not the one scores file .*fm_moved\.json was written "
                       r"with \(its sha256 differs\)"):
        load_assignment(moved, read_scores(moved))
    assert load_assignment(tmp_path / "fm.json", read_scores(tmp_path / "fm.json")).tolist() == [3, 2, 1, 0] * 3


def test_scores_that_cannot_be_written_leave_no_assignment(tmp_path):
    bad = cluster_scores()
    bad = Scores(method="fm", level="cluster", ids=bad.ids, names=bad.names, scores=bad.scores,
                 tiebreak=bad.tiebreak, source=SOURCE, tie_break="cluster id", params={"k": float("nan")})
    with pytest.raises(InputError, match="cannot be written as JSON"):
        write_scores(tmp_path / "fm.json", bad, assignment=np.zeros(12, int))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    path = write_scores(tmp_path / "s.json", class_scores())
    with pytest.raises(InputError, match="--force"):
        write_scores(path, class_scores())
    write_scores(path, class_scores(scores=(0, 0, 0, 0, 9)), force=True)
    assert read_scores(path).scores.tolist() == [0, 0, 0, 0, 9]


@pytest.mark.parametrize("ratio, kept", [
    (0.0, [2, 0, 4, 1, 3]),
    (0.2, [2, 0, 4, 1]),  # removes 1: the lowest is class 3 (score 0, tiebreak .2 < class 1's .4)
    (0.4, [2, 0, 4]),
    (0.5, [2, 0]),  # 2.5 rounds half up: 3 removed
    (0.6, [2, 0]),
    (0.8, [2]),
])
def test_select_groups_by_ratio_with_ties(ratio, kept):
    assert select_groups(class_scores(), ratio=ratio).tolist() == kept


def test_select_groups_ties_fall_back_to_id():
    s = class_scores(scores=(0, 1, 0, 0, 1), tiebreak=(0, 0, 0, 0, 0))
    assert select_groups(s, keep=3).tolist() == [1, 4, 0]
    assert select_groups(s, ratio=0.6).tolist() == [1, 4]


def test_select_groups_by_keep():
    assert select_groups(class_scores(), keep=1).tolist() == [2]
    assert select_groups(class_scores(), keep=5).tolist() == [2, 0, 4, 1, 3]


@pytest.mark.parametrize("kw, message", [
    ({"ratio": 1.5}, r"--ratio must be in \[0, 1\), got 1.5\."),
    ({"ratio": -0.1}, r"--ratio must be in \[0, 1\), got -0.1\."),
    ({"ratio": 1.0}, r"--ratio must be in \[0, 1\), got 1.0\."),
    ({"ratio": "0.5"}, r"--ratio must be a number in \[0, 1\), got '0.5'\."),
    ({"ratio": np.float32(1.5)}, r"--ratio must be in \[0, 1\), got 1.5\."),
    ({"ratio": 0.95}, r"--ratio 0.95 removes all 5 groups"),
    ({"keep": 0}, r"--keep must be in \[1, 5\], got 0\."),
    ({"keep": 6}, r"--keep must be in \[1, 5\], got 6\."),
    ({}, "exactly one"),
    ({"ratio": 0.5, "keep": 2}, "exactly one"),
])
def test_select_groups_refusals(kw, message):
    with pytest.raises(InputError, match=message):
        select_groups(class_scores(), **kw)


def _write_doc(path, **changes):
    doc = class_scores().to_dict()
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


def test_read_refusals(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_scores(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_scores(tmp_path / "bad.json")
    with pytest.raises(InputError, match="not a dptool scores file"):
        read_scores(_write_doc(tmp_path / "f.json", format="other"))
    with pytest.raises(InputError, match="has version 2; this dptool reads version 1"):
        read_scores(_write_doc(tmp_path / "v.json", version=2))
    with pytest.raises(InputError, match="level must be one of"):
        read_scores(_write_doc(tmp_path / "l.json", level="pixel"))
    with pytest.raises(InputError, match="ranks must be a permutation"):
        groups = class_scores().to_dict()["groups"]
        groups[0]["rank"] = groups[1]["rank"]
        read_scores(_write_doc(tmp_path / "r.json", groups=groups))
    with pytest.raises(InputError, match="malformed groups"):
        read_scores(_write_doc(tmp_path / "g.json", groups=[{"id": 0}]))
    doc = class_scores().to_dict()
    del doc["source"]
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="missing 'source'"):
        read_scores(tmp_path / "m.json")


def test_ranks_that_do_not_follow_from_the_scores_are_refused(tmp_path):
    """An edited file (scores changed, ranks left as they were) would make prune keep the wrong groups."""
    path = write_scores(tmp_path / "s.json", class_scores())
    doc = json.loads(path.read_text())
    doc["groups"][3]["score"] = 99.0  # class 3 now ranks first, but its stored rank is still the last
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"s\.json has ranks that do not follow from its scores and tie-break"):
        read_scores(path)
    doc["groups"][3]["score"] = 0.0
    doc["groups"][1]["tiebreak"] = 0.0  # a tie-break edit that reorders classes 1 and 3
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="do not follow from its scores"):
        read_scores(path)


def test_ranks_are_derived_not_given():
    with pytest.raises(TypeError):
        class_scores(ranks=np.arange(5))
    assert class_scores().ranks.tolist() == rank_groups(np.array([3, 0, 5, 0, 1.0]),
                                                        np.array([0.1, 0.4, 0.0, 0.2, 0.0])).tolist()


def test_construction_refusals():
    with pytest.raises(InputError, match="one entry per group"):
        class_scores(scores=(1, 2), tiebreak=(0, 0, 0))
    with pytest.raises(InputError, match="out of range"):
        Scores(method="lm", level="class", ids=[0, 7], names=["a", "b"], scores=[1, 2], tiebreak=[0, 0],
               source=SOURCE, tie_break="id")
    with pytest.raises(InputError, match="unique"):
        Scores(method="lm", level="class", ids=[1, 1], names=["a", "b"], scores=[1, 2], tiebreak=[0, 0],
               source=SOURCE, tie_break="id")


def test_select_groups_takes_numpy_numbers():
    assert select_groups(class_scores(), ratio=np.float32(0.6)).tolist() == select_groups(class_scores(),
                                                                                           ratio=0.6).tolist()


def test_the_plot_lists_whole_names_beside_the_curve(tmp_path, monkeypatch):
    """FM's 1000-cluster names ("cluster 636: n04681989 100%", 27 characters) were cut at 24 to "... 1", read as a
    share of 1%, and the list sat over the axes, hiding the tail of a curve that stays high (EL2N's). Names now fit
    up to 36 characters, a longer one ends in an ellipsis, and the list is drawn right of the axes."""
    import matplotlib.figure

    from dptool.scoring.plot import plot_scores, top_lines

    names = [f"cluster {i}: n0{4681989 + i} {100 - i}%" for i in range(11)] + ["a" * 60]
    s = Scores(method="fm", level="cluster", ids=np.arange(12), names=names, scores=np.arange(12.0),
               tiebreak=np.zeros(12), source=SOURCE, tie_break="cluster id", params={"k": 12})
    lines = top_lines(s, np.argsort(s.ranks, kind="stable"))
    assert lines[1].startswith("   0 " + "a" * 35 + "…") and lines[1].endswith(" 11")
    assert lines[2].startswith("   1 cluster 10: n04681999 90% ")
    assert lines[12].startswith("  11 cluster 0: n04681989 100%")
    drawn = {}
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        drawn["axes"] = fig.axes[0].get_window_extent(renderer)
        drawn["list"] = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_scores(s, tmp_path / "s.png")
    (box,) = drawn["list"]
    assert box.x0 > drawn["axes"].x1  # beside the axes, over none of the curve
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_and_the_table_count_ranks_alike():
    """The terminal's table (score and info) gave the best group rank 0, as the scores file does, while the plot's
    list beside the axis labelled "rank (0 = kept first)" numbered it 1: one group, two numbers. Both now show the
    file's rank, 0 for the group kept first, and the table says so."""
    from dptool.cli._common import score_table
    from dptool.scoring.plot import top_lines

    names = [f"n0{1440764 + 9973 * i}" for i in range(7)]
    s = Scores(method="lm", level="class", ids=np.arange(7), names=names, scores=[0, 3, 0, 5, 0, 1, 3],
               tiebreak=[0.5, 0.1, 0.2, 0, 0.9, 0, 0.3], source={**SOURCE, "num_classes": 7},
               tie_break="summed softmax, then class id")
    ranks = {n: int(r) for n, r in zip(names, s.ranks)}
    table = score_table(score_summary(s, top=7))
    assert table[0] == "top 7 source classes (rank 0 = kept first):"
    shown = {row.split()[-1]: int(row.split()[0]) for row in table[2:-1]}
    assert shown == ranks
    plot = top_lines(s, np.argsort(s.ranks, kind="stable"))
    assert plot[0].split() == ["rank", "name", "score"]
    listed = {row.split()[1]: int(row.split()[0].rstrip(".")) for row in plot[1:]}
    assert listed == ranks
