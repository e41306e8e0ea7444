"""The paired bootstrap on cases whose answer is known exactly."""

import json

import numpy as np
import pytest

from rl.bootstrap import BootstrapResult, bootstrap_means, main, paired_bootstrap, percentile, read_records


def side(values):
    return {f"e{i}": bool(v) for i, v in enumerate(values)}


def test_all_deltas_equal_give_that_value_as_the_interval():
    result = paired_bootstrap(side([0] * 20), side([1] * 20), iterations=500)
    assert (result.ci_low, result.ci_high, result.mean_delta) == (1.0, 1.0, 1.0)
    assert (result.ci_low_count, result.ci_high_count, result.sum_delta) == (20.0, 20.0, 20)
    assert (result.wins, result.losses, result.ties) == (20, 0, 0)
    lost = paired_bootstrap(side([1] * 5), side([0] * 5), iterations=100)
    assert (lost.ci_low, lost.ci_high, lost.sum_delta, lost.losses) == (-1.0, -1.0, -5, 5)


def test_all_zero_deltas_give_zero_interval():
    result = paired_bootstrap(side([1, 0, 1, 1]), side([1, 0, 1, 1]), iterations=200)
    assert (result.ci_low, result.ci_high, result.mean_delta, result.ties) == (0.0, 0.0, 0.0, 4)
    assert (result.a_correct, result.b_correct) == (3, 3)


def test_pairs_by_id_and_lists_missing_ids():
    a = {"x": True, "y": False, "z": True, "only_a": True}
    b = {"z": False, "y": True, "x": True, "only_b1": False, "only_b2": True}
    result = paired_bootstrap(a, b, iterations=100)
    assert result.n_paired == 3 and (result.wins, result.losses, result.ties) == (1, 1, 1)
    assert result.missing_in_a == ["only_b1", "only_b2"] and result.missing_in_b == ["only_a"]
    with pytest.raises(ValueError, match="no example id"):
        paired_bootstrap({"p": True}, {"q": True})


def test_deterministic_by_seed():
    a, b = side([1, 0, 1, 0, 1, 1, 0, 0] * 4), side([1, 1, 0, 0, 1, 1, 1, 0] * 4)
    first, again = paired_bootstrap(a, b, 2000, seed=7), paired_bootstrap(a, b, 2000, seed=7)
    assert first == again
    assert not np.array_equal(bootstrap_means([1, -1, 0] * 5, 50, 7), bootstrap_means([1, -1, 0] * 5, 50, 8))
    assert first.iterations == 2000 and first.seed == 7


def test_interpolated_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 101, 1000):
        values = np.sort(rng.normal(size=n))
        for q in (0, 2.5, 25, 50, 97.5, 100, 33.3):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q), abs=1e-12)
    assert percentile([0.0, 10.0], 25) == 2.5  # a quarter of the way between the two


def test_interval_is_the_percentiles_of_the_resampled_means():
    deltas = [1, 1, 0, 0, 0, -1, 0, 1, 0, 0]
    a = side([0 if d == 1 else 1 if d == -1 else 0 for d in deltas])
    b = side([1 if d == 1 else 0 for d in deltas])
    result = paired_bootstrap(a, b, iterations=3000, seed=3)
    means = bootstrap_means(deltas, 3000, 3)
    assert np.all(np.diff(means) >= 0) and means.shape == (3000,)
    assert result.ci_low == pytest.approx(np.percentile(means, 2.5))
    assert result.ci_high == pytest.approx(np.percentile(means, 97.5))
    assert means.mean() == pytest.approx(0.2, abs=0.01)  # the bootstrap's centre is the mean delta


def test_the_labs_published_comparison_is_reproduced():
    # 7B adapter vs base on 128 items: exact -4 (2 wins, 6 losses), interval [-10, +1] (20,000 resamples)
    a = side([1] * 6 + [0] * 2 + [1] * 100 + [0] * 20)
    b = side([0] * 6 + [1] * 2 + [1] * 100 + [0] * 20)
    result = paired_bootstrap(a, b, iterations=20_000, seed=0)
    assert (result.sum_delta, result.wins, result.losses) == (-4, 2, 6)
    assert round(result.ci_low_count) == -10 and round(result.ci_high_count) in (0, 1)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_records_jsonl_results_json_and_errors(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"uid": "1", "correct": True}, {"uid": 2, "correct": 0},
                                               {"uid": "3", "correct": 1.0}])
    assert read_records(jsonl) == {"1": True, "2": False, "3": True}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"title": "t", "records": [
        {"uid": "1", "correct": False, "boundary": {"stop_aware": {"exact": True}}}]}, indent=2))
    assert read_records(results) == {"1": False}
    assert read_records(results, "boundary.stop_aware.exact") == {"1": True}
    for bad, message in [([{"uid": "1", "correct": True}, {"uid": "1", "correct": False}], "appears twice"),
                         ([{"correct": True}], "need 'uid'"), ([{"uid": "1", "correct": "yes"}], "true/false")]:
        with pytest.raises(ValueError, match=message):
            read_records(write_jsonl(tmp_path / "bad.jsonl", bad))


def test_cli_prints_and_writes_json(tmp_path, capsys):
    a = write_jsonl(tmp_path / "base.jsonl", [{"uid": f"e{i}", "correct": i < 6} for i in range(10)] +
                    [{"uid": "gone", "correct": True}])
    b = write_jsonl(tmp_path / "new.jsonl", [{"uid": f"e{i}", "correct": i < 8} for i in range(10)])
    out = tmp_path / "cmp.json"
    assert main([str(a), str(b), "--iterations", "1000", "--seed", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "new.jsonl vs base.jsonl" in printed and "delta +2 examples" in printed
    assert "2 wins, 0 losses, 8 ties" in printed and "missing in new.jsonl), not compared: 1: gone" in printed
    saved = json.loads(out.read_text())
    fields = set(BootstrapResult.__dataclass_fields__)
    assert fields <= set(saved) and saved["missing_in_b"] == ["gone"] and saved["iterations"] == 1000
    assert main([str(a), str(tmp_path / "nope.jsonl")]) == 2
