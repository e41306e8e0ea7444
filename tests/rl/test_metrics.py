"""The console line a user watches: phase, step n/total, elapsed, ETA, and the sample with its
question and the upstream's answer."""

import io
import re

from rl.metrics import ConsoleSink, _clock


def test_console_line_names_the_phase_counts_from_one_and_estimates_the_rest():
    out = io.StringIO()
    sink = ConsoleSink(out, phase="grpo", total=10)
    sample = {"question": "3 θ 4", "api_answer": "12", "completion": "\\boxed{7}", "reward": 1.0}
    sink.log(5, {"reward/mean": 0.25, "timing/rollout": 1.5, "timing/learn": 2.0, "sample": sample})
    sink.log(6, {"reward/mean": 0.5, "timing/rollout": 1.0})
    first, second = out.getvalue().splitlines()
    assert first.startswith("grpo 6/10  reward=0.25  3.5s  elapsed 0:00  eta 0:00")
    assert first.endswith("| 3 θ 4  api 12 → '\\\\boxed{7}' reward 1")
    assert second.startswith("grpo 7/10  reward=0.5  1.0s") and re.search(r"eta \d+:\d\d$", second)


def test_without_a_total_there_is_no_eta():
    out = io.StringIO()
    ConsoleSink(out, phase="sft").log(0, {"sft/loss": 1.25})
    assert out.getvalue().startswith("sft 1  sft_loss=1.25  0.0s  elapsed") and "eta" not in out.getvalue()


def test_clock():
    assert [_clock(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]


def test_progress_prints_each_tenth_once_and_the_end():
    from rl.metrics import Progress

    out = io.StringIO()
    progress = Progress("eval before", 20, out, parts=4)
    for done in range(1, 21):
        progress.update(done, f" ({done} cached)" if done == 20 else "")
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["eval before: 5/20", "eval before: 10/20",
                                                       "eval before: 15/20", "eval before: 20/20 (20 cached)"]
    assert "eta" in lines[0] and "eta" not in lines[-1]
