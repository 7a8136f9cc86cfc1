"""TokenSampler against llama.cpp's own sampler chain over the whole vocabulary."""

import concurrent.futures
import ctypes
import threading

import llama_cpp
import numpy as np
import pytest

from modelhost.engines.llamacpp import sampler as sampler_module
from modelhost.engines.llamacpp.sampler import TokenSampler, in_parts, sample_rows, top_k_rows
from modelhost.generation import Sampling

N_VOCAB = 5000


def row(values: np.ndarray) -> np.ndarray:
    """A fresh float32 row of logits (the sampler may write into it)."""
    return np.array(values, dtype=np.float32)


def reference_draw(chain: ctypes.c_void_p, values: np.ndarray) -> int:
    """llama.cpp's path: every token a candidate, the whole chain applied."""
    data = (llama_cpp.llama_token_data * len(values))(
        *(llama_cpp.llama_token_data(i, float(v), 0.0) for i, v in enumerate(values))
    )
    array = llama_cpp.llama_token_data_array(data, len(values), -1, False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
    return int(array.data[array.selected].id)


def reference_chain(s: Sampling) -> ctypes.c_void_p:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in (
        llama_cpp.llama_sampler_init_top_k(s.top_k),
        llama_cpp.llama_sampler_init_top_p(s.top_p, 1),
        llama_cpp.llama_sampler_init_min_p(s.min_p, 1),
        llama_cpp.llama_sampler_init_temp(s.temperature),
        llama_cpp.llama_sampler_init_dist(s.seed),
    ):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    return chain


@pytest.mark.parametrize("top_k", [1, 40, 1000])
def test_seeded_draws_match_llama_cpp_over_the_whole_vocabulary(top_k: int) -> None:
    rng = np.random.default_rng(0)
    sampling = Sampling(temperature=0.9, top_k=top_k, top_p=0.9, min_p=0.02, seed=1234)
    ours = TokenSampler(sampling, N_VOCAB, [])
    theirs = reference_chain(sampling)
    try:
        for _ in range(50):
            values = (rng.standard_normal(N_VOCAB) * 3).astype(np.float32)
            expected = reference_draw(theirs, values)
            assert ours.sample(row(values)) == expected
    finally:
        ours.close()
        llama_cpp.llama_sampler_free(theirs)


def test_greedy_takes_the_largest_logit() -> None:
    values = np.zeros(N_VOCAB, dtype=np.float32)
    values[4321] = 5.0
    sampler = TokenSampler(Sampling(temperature=0.0), N_VOCAB, [])
    assert sampler.sample(row(values)) == 4321


def test_banned_tokens_are_never_chosen() -> None:
    values = np.zeros(N_VOCAB, dtype=np.float32)
    values[7], values[8], values[9] = 50.0, 40.0, 1.0  # 7 and 8 end generation
    greedy = TokenSampler(Sampling(temperature=0.0), N_VOCAB, [7, 8])
    assert greedy.sample(row(values)) == 9
    sampled = TokenSampler(
        Sampling(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0), N_VOCAB, [7, 8]
    )
    draws = {sampled.sample(row(values)) for _ in range(200)}
    sampled.close()
    assert not draws & {7, 8}


def test_repetition_penalty_steers_greedy_away_from_recent_tokens() -> None:
    values = np.zeros(N_VOCAB, dtype=np.float32)
    values[10], values[11] = 3.0, 2.0
    plain = TokenSampler(Sampling(temperature=0.0), N_VOCAB, [])
    penalized = TokenSampler(Sampling(temperature=0.0, repetition_penalty=2.0), N_VOCAB, [])
    assert [plain.sample(row(values)) for _ in range(2)] == [10, 10]
    # The second time 10's logit is halved to 1.5, below 11's 2.0.
    assert [penalized.sample(row(values)) for _ in range(2)] == [10, 11]


@pytest.mark.parametrize(
    ("top_p", "min_p", "scale"),
    [(0.9, 0.0, 3.0), (0.95, 0.05, 3.0), (1.0, 0.05, 3.0), (0.5, 0.0, 0.3), (0.99, 0.0, 0.05)],
)
def test_without_top_k_numpy_truncates_and_the_draw_is_still_llama_cpp_s(
    top_p: float, min_p: float, scale: float
) -> None:
    """top_k = 0: top-p and min-p over the whole vocabulary, done by numpy, from peaked
    (scale 3) to nearly flat (scale 0.05) distributions."""
    rng = np.random.default_rng(1)
    sampling = Sampling(temperature=0.8, top_k=0, top_p=top_p, min_p=min_p, seed=99)
    ours = TokenSampler(sampling, N_VOCAB, [])
    theirs = reference_chain(sampling)
    try:
        for _ in range(50):
            values = (rng.standard_normal(N_VOCAB) * scale).astype(np.float32)
            expected = reference_draw(theirs, values)
            assert ours.sample(row(values)) == expected
    finally:
        ours.close()
        llama_cpp.llama_sampler_free(theirs)


def test_sample_rows_gives_each_sampler_what_sample_gives() -> None:
    """A step's rows at once: greedy ones in one argmax (banned tokens out first), a mix
    row by row; the tokens are those each sampler picks from its own row."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, N_VOCAB)).astype(np.float32)
    banned = [int(rows[1].argmax()), int(rows[3].argmax())]  # the top of rows 1 and 3

    def samplers(*settings: Sampling) -> list[TokenSampler]:
        return [TokenSampler(s, N_VOCAB, banned if i % 2 else []) for i, s in enumerate(settings)]

    greedy = [Sampling(temperature=0.0)] * 6
    mixed = [*greedy[:4], Sampling(seed=5), Sampling(temperature=0.0, repetition_penalty=1.5)]
    for settings in (greedy, mixed):
        expected = [s.sample(rows[i].copy()) for i, s in enumerate(samplers(*settings))]
        assert sample_rows(samplers(*settings), rows.copy()) == expected
    picked = sample_rows(samplers(*greedy), rows.copy())
    assert picked[0] == rows[0].argmax() and picked[1] != banned[0]


def test_picks_among_the_graphs_candidates_are_the_rows_own() -> None:
    """A row's GRAPH_TOP_K likeliest ids and logits, in any order, as llama.cpp's graph hands
    them back: the token each sampler that fits the graph picks from them is the one it
    picks from the whole row, banned tokens among the candidates included."""
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((40, N_VOCAB)).astype(np.float32)
    settings = [
        Sampling(temperature=0.0),
        Sampling(seed=7),
        Sampling(top_k=5, top_p=1.0, min_p=0.0, seed=8),
        Sampling(top_k=40, top_p=0.5, temperature=1.5, seed=9),
    ]
    for i, values in enumerate(rows):
        s = settings[i % len(settings)]
        order = np.argsort(-values)
        banned = [int(order[0]), int(order[3])] if i % 3 else []  # some top tokens out
        from_row = TokenSampler(s, N_VOCAB, banned)
        from_graph = TokenSampler(s, N_VOCAB, banned)
        assert from_graph.fits_graph
        ids = rng.permutation(order[: sampler_module.GRAPH_TOP_K]).astype(np.int32)
        try:
            for _ in range(3):  # the seeded chains advance alike
                expected = sample_rows([from_row], values[None, :].copy())[0]
                assert from_graph.pick_among(ids, values[ids]) == expected
        finally:
            from_row.close()
            from_graph.close()


def test_what_needs_its_row_does_not_fit_the_graph() -> None:
    def fits(s: Sampling, banned: list[int] = [], **options: int) -> bool:  # noqa: B006
        sampler = TokenSampler(s, N_VOCAB, banned, **options)  # type: ignore[arg-type]
        try:
            return sampler.fits_graph
        finally:
            sampler.close()

    assert fits(Sampling(temperature=0.0), list(range(100)))  # skipped among the candidates
    assert fits(Sampling(top_k=40), [1] * 8) and not fits(Sampling(top_k=41), [1] * 8)
    assert not fits(Sampling(top_k=0))  # the whole row's nucleus
    assert not fits(Sampling(temperature=0.0), top_logprobs=2)
    assert not fits(Sampling(temperature=0.0, repetition_penalty=1.1))


def test_a_greedy_pick_whose_candidates_are_all_banned_says_why() -> None:
    ids = np.arange(sampler_module.GRAPH_TOP_K, dtype=np.int32)
    sampler = TokenSampler(Sampling(temperature=0.0), N_VOCAB, ids.tolist())
    with pytest.raises(sampler_module.NoTokenAllowed, match="all end-of-generation tokens"):
        sampler.pick_among(ids, np.ones(len(ids), np.float32))


@pytest.mark.parametrize("n_vocab", [5000, 49152, 151936])  # Qwen's: not whole columns
@pytest.mark.parametrize("group", [1, 2, 8])  # rows folded in one call: 5 rows, 3 or 1 calls
def test_top_k_rows_holds_each_rows_top_k(
    n_vocab: int, group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sampler_module, "GROUP_LOGITS", group * n_vocab)
    rng = np.random.default_rng(n_vocab)
    rows = (rng.standard_normal((5, n_vocab)) * 3).astype(np.float32)
    rows[1, -40:] += 30.0  # the top in the last 40 (past the whole columns where there are)
    rows[2, 7::13] += 20.0  # the top spread over every column
    rows[3, :-40] = -np.inf  # banned all but 40: every id may come back, the top among them
    for k in (1, 40, 200):
        for i, (row, ids) in enumerate(zip(rows, top_k_rows(rows, k), strict=True)):
            top = np.argsort(-row, kind="stable")[:k]
            expected = set(top[row[top] > -np.inf].tolist())  # none that cannot be drawn
            assert expected <= set(ids.tolist())
            assert len(ids) < k + 128 or i == 3


def test_many_rows_are_read_by_several_threads_with_the_same_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step with many logits shares its rows among threads: greedy, drawn and mixed
    steps pick exactly what one thread picks, each row's token at its own place."""
    rng = np.random.default_rng(11)
    rows = (rng.standard_normal((7, 49152)) * 3).astype(np.float32)
    greedy = [Sampling(temperature=0.0)] * 7
    drawn = [Sampling(seed=i) for i in range(7)]
    mixed = [*drawn[:3], *greedy[:3], Sampling(seed=9, repetition_penalty=1.3)]

    def tokens(settings: list[Sampling]) -> list[int]:
        samplers = [TokenSampler(s, 49152, []) for s in settings]
        picked = sample_rows(samplers, rows.copy())
        for sampler in samplers:
            sampler.close()
        return picked  # type: ignore[return-value]

    alone = [tokens(settings) for settings in (greedy, drawn, mixed)]
    readers: set[str] = set()

    def argmax_noting_the_reader(part: np.ndarray) -> list[int]:
        readers.add(threading.current_thread().name)
        return part.argmax(axis=1).tolist()

    monkeypatch.setattr(sampler_module, "SCAN_THREADS", 3)
    monkeypatch.setattr(sampler_module, "PARALLEL_LOGITS", rows[:2].size)
    assert [tokens(settings) for settings in (greedy, drawn, mixed)] == alone
    assert in_parts(argmax_noting_the_reader, rows) == rows.argmax(axis=1).tolist()
    assert len(readers) > 1


def test_a_failed_part_returns_only_once_no_helper_reads_the_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """llama.cpp may reuse the rows once sampling returns, even by an error: the helpers'
    parts are waited for first."""
    monkeypatch.setattr(sampler_module, "SCAN_THREADS", 2)
    monkeypatch.setattr(sampler_module, "PARALLEL_LOGITS", 1)
    helper_reading = threading.Event()
    waited_for: list[concurrent.futures.Future[list[int]]] = []
    real_wait = concurrent.futures.wait

    def wait(futures, *args, **kwargs):  # type: ignore[no-untyped-def]
        waited_for.extend(futures)
        return real_wait(futures, *args, **kwargs)

    def work(part: np.ndarray) -> list[int]:
        if threading.current_thread() is threading.main_thread():
            assert helper_reading.wait(10)
            raise RuntimeError("this thread's part failed")
        helper_reading.set()
        return [0] * len(part)

    monkeypatch.setattr(concurrent.futures, "wait", wait)
    with pytest.raises(RuntimeError, match="part failed"):
        in_parts(work, np.zeros((4, 8), np.float32))
    assert len(waited_for) == 1 and waited_for[0].done()


class AskedAbout:
    """A token set that records which tokens were asked about, and how often it was walked."""

    def __init__(self, tokens: set[int]) -> None:
        self.tokens, self.asked, self.walks = tokens, [], 0

    def __contains__(self, token: object, /) -> bool:
        self.asked.append(token)
        return token in self.tokens

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return iter(sorted(self.tokens))


def test_a_greedy_sampler_asks_only_about_the_tokens_it_picks() -> None:
    """ignore_eos on a greedy request: the end-of-generation tokens on top are passed over
    one by one, as taking them all out first would (the lowest id among equal logits), and
    the vocabulary is never walked to find them; a draw takes them all out."""
    values = np.zeros(N_VOCAB, dtype=np.float32)
    values[[5, 9, 11]] = [9.0, 8.0, 7.0]  # the three likeliest are banned
    values[[12, 2, 400]] = 6.0  # then a tie: 2 is the lowest id; 400 is banned but unasked
    banned = {5, 9, 11, 400}
    eager = TokenSampler(Sampling(temperature=0.0), N_VOCAB, sorted(banned))
    assert eager.sample(row(values)) == 2
    lazy = AskedAbout(banned)
    assert TokenSampler(Sampling(temperature=0.0), N_VOCAB, lazy).sample(row(values)) == 2
    assert lazy.asked == [5, 9, 11, 2] and lazy.walks == 0
    lazy = AskedAbout(banned)
    rows = np.stack([values, values])
    greedy = [TokenSampler(Sampling(temperature=0.0), N_VOCAB, lazy) for _ in range(2)]
    assert sample_rows(greedy, rows) == [2, 2] and lazy.walks == 0
    drawn = TokenSampler(Sampling(seed=1, top_k=3), N_VOCAB, lazy)
    assert lazy.walks == 1 and drawn.sample(row(values)) in {2, 12}
