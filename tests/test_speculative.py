"""Speculative decoding: the target's own output, whatever the draft proposes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmexport
from lmexport.bench import OrtEngine, measure
from lmexport.errors import LmexportError, RuntimeInputError
from lmexport.runtime import LlamaRunner, share_threads
from lmexport.runtime.sampling import Sampling, filtered_probabilities
from lmexport.runtime.speculative import SpeculativeStats, _Model

from helpers import assert_bad_input, run, small_config, write_hf_folder

PROMPT = [[3, 14, 15, 92, 65]]


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-tiny's shape with other weights: a draft that is often wrong."""
    return lmexport.convert("llama-tiny", tmp_path_factory.mktemp("draft") / "out", seed=5)


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-tiny's plain target: its cache grows by a Concat in the graph, never shared."""
    return lmexport.convert("llama-tiny", tmp_path_factory.mktemp("plain") / "out", target="plain")


@pytest.mark.parametrize("draft_kind", ["same", "other"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_target(
    tiny_folder: Path, other_draft: Path, draft_kind: str, k: int
) -> None:
    target = LlamaRunner.load(tiny_folder)
    draft = target if draft_kind == "same" else LlamaRunner.load(other_draft)
    stats = SpeculativeStats()
    expected = target.generate(PROMPT, 40, eos_token_id=[])
    got = target.generate(PROMPT, 40, eos_token_id=[], draft=draft, draft_tokens=k, stats=stats)
    assert np.array_equal(got, expected)
    if draft_kind == "same":
        assert stats.acceptance_rate == 1.0
    else:
        assert stats.acceptance_rate < 1.0  # rejections happened, so caches were rolled back
    # Rolled back to exactly the accepted tokens after every round: the target's cache holds
    # the whole sequence but its newest token (fed next round), the draft's no more than that.
    assert len(stats.cache_lengths) == stats.rounds > 1
    for sequence, big, small in stats.cache_lengths:
        assert big == sequence - 1 and small <= sequence - 1


@pytest.mark.parametrize("penalty", [0.5, 2.0])
def test_draft_sees_the_penalty_the_target_sees(tiny_folder: Path, penalty: float) -> None:
    """The draft's repetition penalty counts its own earlier proposals, as the target's does:
    a draft with the target's weights then agrees with it on every proposal."""
    target = LlamaRunner.load(tiny_folder)
    stats = SpeculativeStats()
    options = {"eos_token_id": [], "repetition_penalty": penalty}
    expected = target.generate(PROMPT, 40, **options)
    got = target.generate(PROMPT, 40, draft=target, draft_tokens=4, stats=stats, **options)
    assert np.array_equal(got, expected)
    assert stats.acceptance_rate == 1.0


@pytest.mark.parametrize("fixture", ["tiny_folder", "plain_folder"])
@pytest.mark.parametrize("shared", [False, True])
def test_rolled_back_cache_holds_no_stale_entries(
    fixture: str, shared: bool, request: pytest.FixtureRequest
) -> None:
    """After proposals are cut back and others fed in their place, the cache is exactly the
    one a fresh run over the final sequence builds: same length, same logits. Numpy caches are
    sliced; a shared buffer only forgets its length and the next step overwrites the slots."""
    runner = LlamaRunner.load(request.getfixturevalue(fixture), io_binding=shared)
    prompt = PROMPT[0]
    rolled = _Model(runner, capacity=16)
    assert (rolled.bound is not None) == (shared and fixture == "tiny_folder")
    rolled.feed([*prompt, 7, 8, 9, 10], 5)  # four proposals
    rolled.keep(len(prompt) + 1)  # one accepted
    cache = rolled.bound.host_copy() if rolled.bound is not None else rolled.cache
    assert cache is not None
    assert all(c.shape[2] == len(prompt) + 1 for c in cache)
    final = [*prompt, 7, 21, 22]  # the rejected ones replaced
    got = rolled.feed(final, 2)
    fresh = _Model(runner, capacity=16).feed(final, 2)
    assert got.shape == fresh.shape
    assert np.abs(got - fresh).max() <= 1e-5


def test_turn_taking_sessions_do_not_spin(tiny_folder: Path, other_draft: Path) -> None:
    """A target and draft loaded as `generate --draft` loads them: same tokens, and neither
    session's threads spin between runs (they would hold the cores the other one needs)."""
    spin = "session.intra_op.allow_spinning"
    pair = [LlamaRunner.load(f, spinning=False) for f in (tiny_folder, other_draft)]
    for runner in pair:
        assert runner.session.get_session_options().get_session_config_entry(spin) == "0"
    expected = LlamaRunner.load(tiny_folder).generate(PROMPT, 12, eos_token_id=[])
    got = pair[0].generate(PROMPT, 12, eos_token_id=[], draft=pair[1])
    assert np.array_equal(got, expected)


def test_first_token_distribution_matches_target(tiny_folder: Path, other_draft: Path) -> None:
    """Over many seeds, the first sampled token follows the target's distribution, not the
    draft's (chi-square with a fixed seed set)."""
    target, draft = LlamaRunner.load(tiny_folder), LlamaRunner.load(other_draft)
    sampling = Sampling(temperature=1.0, top_k=8)
    p = filtered_probabilities(target.logits(PROMPT)[:, -1], sampling)[0]
    counts = np.zeros_like(p)
    runs = 1500
    for seed in range(runs):
        (first,) = next(
            iter(target.stream(PROMPT, 4, eos_token_id=[], temperature=1.0, top_k=8, seed=seed,
                               draft=draft, draft_tokens=3))
        )  # fmt: skip
        counts[first] += 1
    support = p > 0
    assert counts[~support].sum() == 0
    expected = p[support] * runs
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001


def test_draft_with_other_vocabulary(tiny_folder: Path, tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "src", small_config(vocab_size=300))
    draft = lmexport.convert(str(tmp_path / "src"), tmp_path / "draft")
    with pytest.raises(RuntimeInputError, match="vocabulary"):
        LlamaRunner.load(tiny_folder).generate(PROMPT, 4, draft=LlamaRunner.load(draft))
    assert_bad_input(
        ["generate", str(tiny_folder), "--ids", "1,2", "--draft", str(draft)], "vocabulary"
    )


def test_draft_shorter_than_the_generation(tiny_folder: Path, tmp_path: Path) -> None:
    """A draft's context bounds the generation as the target's does: refused before any run,
    not an onnxruntime error once the sequence outgrows it."""
    write_hf_folder(tmp_path / "src", small_config(vocab_size=512, max_position_embeddings=16))
    draft = lmexport.convert(str(tmp_path / "src"), tmp_path / "draft")
    target = LlamaRunner.load(tiny_folder)
    with pytest.raises(RuntimeInputError, match="draft's context of 16"):
        target.stream([[1, 2, 3]], 14, draft=LlamaRunner.load(draft))
    assert target.generate([[1, 2, 3]], 13, draft=LlamaRunner.load(draft)).shape[1] <= 13
    assert_bad_input(
        ["generate", str(tiny_folder), "--ids", "1,2,3", "--max-new-tokens", "30",
         "--draft", str(draft)],
        "draft's context",
    )  # fmt: skip


def test_draft_checked_at_the_call(tiny_folder: Path, tmp_path: Path) -> None:
    """stream() checks the draft when called, as it does the rest of the request."""
    target = LlamaRunner.load(tiny_folder)
    no_cache = lmexport.convert("llama-tiny", tmp_path / "nokv", target="plain", kv_cache=False)
    with pytest.raises(RuntimeInputError, match="KV-cache"):
        target.stream(PROMPT, 4, draft=LlamaRunner.load(no_cache))
    with pytest.raises(RuntimeInputError, match="at least 1"):
        target.stream(PROMPT, 4, draft=target, draft_tokens=0)
    write_hf_folder(tmp_path / "src", small_config(vocab_size=300))
    other = lmexport.convert(str(tmp_path / "src"), tmp_path / "other")
    with pytest.raises(RuntimeInputError, match="vocabulary"):
        target.stream(PROMPT, 4, draft=LlamaRunner.load(other))


def test_bench_acceptance_is_the_timed_rounds(tiny_folder: Path, tmp_path: Path) -> None:
    """`bench --draft` reports the acceptance of the generation it timed, not one mixed with
    its short warm-up rounds (an int4 draft: some proposals pass, more in the warm-up's)."""
    lmexport.optimize(tiny_folder, tmp_path / "int4", quantize="int4")
    target, draft = LlamaRunner.load(tiny_folder), LlamaRunner.load(tmp_path / "int4")
    prompt = np.array(PROMPT[0])
    stats = SpeculativeStats()
    for _ in target.stream(prompt[None], 9, eos_token_id=[], draft=draft, stats=stats):
        pass
    [figures] = measure([OrtEngine("speculative", target, draft)], prompt, 9, repeats=2)
    assert 0 < stats.acceptance_rate < 1
    assert figures.acceptance_rate == stats.acceptance_rate


# Run in a child: `share_threads` sets this process's onnxruntime environment for good.
SHARED_POOL = """
import sys
import numpy as np
import onnx
import lmexport
from lmexport.errors import LmexportError
from lmexport.optimizers.check import check_same
from lmexport.runtime import LlamaRunner, share_threads
from lmexport.runtime.session import create_session

target_folder, draft_folder, out = sys.argv[1:]
share_threads(2)
lmexport.optimize(draft_folder, out, quantize="int4")  # its accuracy sessions
graph = onnx.load(target_folder + "/model.onnx")
assert check_same(graph, graph) == 0.0  # the sessions of optimize's check
target, draft = LlamaRunner.load(target_folder, threads=2), LlamaRunner.load(out)
for runner in (target, draft):
    assert runner.session.get_session_options().use_per_session_threads is False
prompt = [[3, 14, 15, 92, 65]]
alone = target.generate(prompt, 12, eos_token_id=[])
assert np.array_equal(target.generate(prompt, 12, eos_token_id=[], draft=draft), alone)
for refused in (lambda: share_threads(2), lambda: create_session(out + "/model.onnx", threads=1)):
    try:
        refused()
    except LmexportError as e:
        print(e)
"""


def test_pair_on_one_pool(tiny_folder: Path, other_draft: Path, tmp_path: Path) -> None:
    """`share_threads`: every session of the process on one pool (optimize's own sessions
    included), a pair on it decodes as the target alone, and a second pool or a session with
    threads of its own is refused in one line."""
    args = [str(tiny_folder), str(other_draft), str(tmp_path / "int4")]
    done = subprocess.run(
        [sys.executable, "-c", SHARED_POOL, *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "share_threads must come before this process's first onnxruntime session",
        "this process's sessions share 2 threads (share_threads), not 1",
    ]


def test_share_threads_after_a_session_is_refused(tiny_folder: Path) -> None:
    """The first session fixed onnxruntime's environment: a pool asked for later would not
    exist, and sessions told to use it would have none."""
    LlamaRunner.load(tiny_folder)
    with pytest.raises(LmexportError, match="before this process's first"):
        share_threads(2)


def test_generate_draft_in_the_program(tiny_folder: Path, other_draft: Path) -> None:
    """The `lmexport` program's own process puts a pair on one pool: same tokens as the
    target alone (in-process calls, as the other tests make them, keep threads per session)."""
    program = [sys.executable, "-c", "from lmexport.cli import main; main()", "generate"]
    args = [str(tiny_folder), "--ids", "3,14,15,92,65", "--max-new-tokens", "12"]
    paired = subprocess.run(
        [*program, *args, "--draft", str(other_draft)], capture_output=True, text=True, timeout=600
    )
    assert paired.returncode == 0, paired.stderr
    code, alone, err = run("generate", *args)
    assert code == 0, err
    assert paired.stdout == alone
