"""`token_statistics` against a slow per-position reference (sets, dicts, float64) and its properties."""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ta_opd_verl import teachability
from ta_opd_verl.teachability import TokenStatistics, teacher_entries, token_statistics
from ta_opd_verl.teacher_head import logit_log_prob_blocks

NEG_INF = float("-inf")


def reference_row(
    logits,
    teacher_ids,
    teacher_lps,
    k,
    student_probs="exact",
    exact=None,
    entropy_mode="full",
    floor=1e-12,
    teacher_list="all",
):
    """D, C, H of one position, straight from the definitions, in float64 Python arithmetic."""
    student_topk = torch.topk(logits, k).indices.tolist()
    log_probs = torch.log_softmax(logits.double(), -1).tolist()
    teacher = {}
    present = []
    for token, lp in zip(teacher_ids.tolist(), teacher_lps.tolist(), strict=True):
        if lp != NEG_INF:
            teacher.setdefault(token, lp)
            present.append((lp, token))
    teacher_topk = [token for _, token in sorted(present, key=lambda e: -e[0])[:k]]
    if teacher_list == "top_k":
        teacher = {token: lp for token, lp in teacher.items() if token in teacher_topk}
    union = set(student_topk) | set(teacher_topk)

    def p_teacher(v):
        if v in teacher:
            return math.exp(teacher[v])
        if exact is not None and v in student_topk:
            return math.exp(exact[student_topk.index(v)])
        return 0.0

    def p_student(v):
        if student_probs == "exact" or v in student_topk:
            return math.exp(log_probs[v])
        return 0.0

    z_teacher = sum(p_teacher(v) for v in union)
    z_student = sum(p_student(v) for v in union)
    disagreement = 0.0
    for v in union if z_teacher > 0 else ():
        pt, ps = max(p_teacher(v) / z_teacher, floor), max(p_student(v) / z_student, floor)
        if pt > 0:
            disagreement += pt * (math.log(pt) - math.log(ps))
    compatibility = min(1.0, max(0.0, sum(p_teacher(v) for v in student_topk)))
    if entropy_mode == "full":
        entropy = -sum(math.exp(lp) * lp for lp in log_probs if lp != NEG_INF)
    elif k == 1:
        entropy = 0.0
    else:
        top = [math.exp(log_probs[v]) for v in student_topk]
        q = [p / sum(top) for p in top]
        entropy = -sum(p * math.log(p) for p in q if p > 0) / math.log(k)
    return disagreement, compatibility, entropy


def reference(logits, teacher_ids, teacher_lps, k, student_probs="exact", exact=None, **options):
    """`reference_row` at every position; `options`: its `entropy_mode`, `floor`, `teacher_list`."""
    vocab, kt = logits.shape[-1], teacher_ids.shape[-1]
    lead = logits.shape[:-1]
    flat_exact = None if exact is None else exact.reshape(-1, k).tolist()
    rows = [
        reference_row(
            row,
            ids,
            lps,
            k,
            student_probs,
            None if flat_exact is None else flat_exact[i],
            **options,
        )
        for i, (row, ids, lps) in enumerate(
            zip(
                logits.reshape(-1, vocab).float(),
                teacher_ids.reshape(-1, kt),
                teacher_lps.reshape(-1, kt),
                strict=True,
            )
        )
    ]
    out = torch.tensor(rows, dtype=torch.float64).reshape(*lead, 3)
    return out[..., 0], out[..., 1], out[..., 2]


def make_teacher(logits, kt, overlap, generator, absent_fraction=0.0):
    """A teacher list of kt distinct ids with log-probs from a random teacher distribution."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    teacher_logits = torch.randn(flat.shape, generator=generator, dtype=torch.float64) * 2
    teacher_lp_full = torch.log_softmax(teacher_logits, -1)
    ids = []
    for row in flat:
        order = torch.topk(row, vocab).indices
        if overlap == "full":
            chosen = order[:kt]
        elif overlap == "none":
            chosen = order[vocab - kt :]
        else:
            chosen = torch.randperm(vocab, generator=generator)[:kt]
        ids.append(chosen)
    ids = torch.stack(ids)
    lps = torch.gather(teacher_lp_full, -1, ids).float()
    if absent_fraction:
        absent = torch.rand(ids.shape, generator=generator) < absent_fraction
        lps = lps.masked_fill(absent, NEG_INF)
        ids = ids.masked_fill(absent, 0)
    return ids.reshape(*lead, kt), lps.reshape(*lead, kt), teacher_lp_full.reshape(*lead, vocab)


def assert_matches(stats, expected, atol=2e-4):
    for got, want, name in zip(stats, expected, ("D", "C", "H"), strict=True):
        assert got.dtype == torch.float64, name
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=2e-4, msg=name)


CASES = [
    # lead shape, V, k, Kt, overlap, absent fraction
    ((7,), 30, 4, 4, "random", 0.0),
    ((2, 5), 40, 4, 2, "random", 0.0),  # Kt < k
    ((3, 4), 40, 4, 9, "random", 0.0),  # Kt > k: entries beyond the teacher's top k still count in S
    ((2, 3, 2), 25, 5, 5, "full", 0.0),  # teacher ids = the student's top-k
    ((6,), 25, 5, 5, "none", 0.0),  # teacher ids disjoint from the student's top-k
    ((3, 3), 12, 12, 6, "random", 0.0),  # k = V
    ((4, 4), 30, 6, 10, "random", 0.3),  # absent (-inf) entries
    ((5,), 20, 1, 3, "random", 0.0),  # k = 1
    ((1, 1), 16, 3, 3, "random", 0.0),  # one position
]


@pytest.mark.parametrize(
    ("student_probs", "floor", "teacher_list"),
    [
        ("exact", 1e-12, "all"),
        ("topk_only", 1e-12, "all"),
        ("exact", 0.0, "all"),
        ("topk_only", 1e-12, "top_k"),
    ],
)
@pytest.mark.parametrize(("lead", "vocab", "k", "kt", "overlap", "absent"), CASES)
def test_token_statistics_matches_reference(
    lead, vocab, k, kt, overlap, absent, student_probs, floor, teacher_list
):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((lead, vocab, k, kt, overlap)).encode()))
    logits = torch.randn(*lead, vocab, generator=gen) * 3
    ids, lps, _ = make_teacher(logits, kt, overlap, gen, absent)
    stats = token_statistics(
        logits,
        ids,
        lps,
        k=k,
        student_probs=student_probs,
        student_prob_floor=floor,
        teacher_list=teacher_list,
    )
    assert isinstance(stats, TokenStatistics)
    expected = reference(logits, ids, lps, k, student_probs, floor=floor, teacher_list=teacher_list)
    assert_matches(stats, expected)


def test_without_a_floor_d_is_eq_9_where_the_floor_caps_it():
    # The teacher's favourite ids sit at e^-60 under a peaked student: the 1e-12 floor caps their log ratio.
    logits = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    ids, lps = torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.6, 0.4]]))
    paper = token_statistics(logits, ids, lps, k=1, student_prob_floor=0.0)
    floored = token_statistics(logits, ids, lps, k=1)
    expected = reference(logits, ids, lps, 1, floor=0.0)[0]
    torch.testing.assert_close(paper.disagreement, expected, atol=1e-4, rtol=1e-6)
    assert float(expected - floored.disagreement) > 30


@pytest.mark.parametrize("entropy_mode", ["full", "topk"])
@pytest.mark.parametrize(("kt", "overlap"), [(3, "random"), (8, "random"), (4, "none")])
def test_exact_teacher_logprobs_at_student_topk(kt, overlap, entropy_mode):
    gen = torch.Generator().manual_seed(kt)
    k, vocab = 5, 30
    logits = torch.randn(4, 6, vocab, generator=gen) * 2
    ids, lps, teacher_full = make_teacher(logits, kt, overlap, gen)
    student_ids = torch.topk(logits, k).indices
    exact = torch.gather(teacher_full, -1, student_ids).float()
    stats = token_statistics(
        logits, ids, lps, k=k, teacher_logprobs_at_student_topk=exact, entropy_mode=entropy_mode
    )
    assert_matches(stats, reference(logits, ids, lps, k, exact=exact.double(), entropy_mode=entropy_mode))
    # Independent check of C: the teacher's true mass on the student's top-k.
    torch.testing.assert_close(stats.compatibility.double(), exact.double().exp().sum(-1), atol=1e-5, rtol=0)


def test_exact_values_only_fill_ids_missing_from_the_list():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    ids = torch.tensor([[1, 3]])
    lps = torch.tensor([[math.log(0.5), math.log(0.1)]])
    exact = torch.tensor([[math.log(0.2), math.log(0.9)]])  # the list's 0.5 for id 1 wins over 0.9
    stats = token_statistics(logits, ids, lps, k=2, teacher_logprobs_at_student_topk=exact)
    assert stats.compatibility.item() == pytest.approx(0.7, abs=1e-6)
    without = token_statistics(logits, ids, lps, k=2)
    assert without.compatibility.item() == pytest.approx(0.5, abs=1e-6)


def test_given_student_entropy_is_returned_and_topk_mode_ignores_it():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 20, generator=gen)
    ids, lps, _ = make_teacher(logits, 4, "random", gen)
    given_entropy = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    stats = token_statistics(logits, ids, lps, k=4, student_entropy=given_entropy)
    assert stats.entropy.dtype == torch.float64
    torch.testing.assert_close(stats.entropy, given_entropy)
    plain = token_statistics(logits, ids, lps, k=4)
    torch.testing.assert_close(stats.disagreement, plain.disagreement)
    topk = token_statistics(logits, ids, lps, k=4, student_entropy=given_entropy, entropy_mode="topk")
    expected = reference(logits, ids, lps, 4, entropy_mode="topk")[2]
    torch.testing.assert_close(topk.entropy.double(), expected, atol=1e-5, rtol=1e-5)


def test_teacher_list_with_no_present_entry_gives_zero():
    logits = torch.randn(4, 10)
    ids = torch.zeros(4, 3, dtype=torch.long)
    lps = torch.full((4, 3), NEG_INF)
    stats = token_statistics(logits, ids, lps, k=3)
    assert torch.equal(stats.disagreement, torch.zeros(4))
    assert torch.equal(stats.compatibility, torch.zeros(4))


def test_absent_entries_ids_are_ignored_even_when_they_collide():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    ids = torch.tensor([[0, 1]])  # id 0 is the student's argmax but its entry is absent
    lps = torch.tensor([[NEG_INF, math.log(0.3)]])
    stats = token_statistics(logits, ids, lps, k=2)
    assert stats.compatibility.item() == pytest.approx(0.3, abs=1e-6)
    assert_matches(stats, reference(logits, ids, lps, 2))


def test_minus_inf_student_logits_keep_entropy_finite():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 16, generator=gen)
    logits[:, 10:] = NEG_INF
    ids, lps, _ = make_teacher(logits[:, :10].contiguous(), 3, "random", gen)
    stats = token_statistics(logits, ids, lps, k=4)
    assert torch.isfinite(stats.entropy).all()
    assert_matches(stats, reference(logits, ids, lps, 4))


def test_low_precision_logits_compute_their_log_softmax_in_float32():
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(4, 5, 50, generator=gen) * 3).bfloat16()
    ids, lps, _ = make_teacher(logits.float(), 6, "random", gen)
    stats = token_statistics(logits, ids, lps.bfloat16(), k=6)
    expected = token_statistics(logits.float(), ids, lps.bfloat16().float(), k=6)
    for got, want in zip(stats, expected, strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want)


def test_inputs_that_require_grad_are_accepted():
    logits = torch.randn(2, 3, 12, requires_grad=True)
    ids, lps, _ = make_teacher(logits.detach(), 4, "random", torch.Generator().manual_seed(0))
    stats = token_statistics(logits, ids, lps, k=4)
    assert not stats.disagreement.requires_grad
    assert_matches(stats, reference(logits.detach(), ids, lps, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 13}, "k must be"),
        ({"student_probs": "approx"}, "student_probs"),
        ({"student_prob_floor": -1e-12}, "student_prob_floor must be >= 0"),
        ({"student_probs": "topk_only", "student_prob_floor": 0.0}, "needs student_prob_floor > 0"),
        ({"teacher_list": "top_32"}, "teacher_list"),
        ({"entropy_mode": "half"}, "entropy_mode"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"student_entropy": torch.zeros(3)}, "student_entropy"),
        ({"teacher_logprobs_at_student_topk": torch.zeros(2, 3, 5)}, "teacher_logprobs_at_student_topk"),
        ({"student_topk_ids": torch.zeros(2, 3, 5, dtype=torch.long)}, "student_topk_ids"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, message):
    logits = torch.randn(2, 3, 12)
    ids = torch.randint(0, 12, (2, 3, 4))
    with pytest.raises(ValueError, match=message):
        token_statistics(logits, ids, torch.zeros(2, 3, 4), **{"k": 4, **kwargs})


def test_mismatched_teacher_shapes_are_rejected():
    with pytest.raises(ValueError, match="teacher ids"):
        token_statistics(torch.randn(2, 12), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3), k=4)


def random_case(seed, vocab, k, kt, rows):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * (1 + seed % 4)
    ids, lps, _ = make_teacher(logits, kt, ("random", "full", "none")[seed % 3], gen, 0.2 * (seed % 2))
    return logits, ids, lps


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    vocab=st.integers(2, 60),
    data=st.data(),
)
def test_self_teacher_has_zero_disagreement_and_topk_mass_compatibility(seed, vocab, data):
    k = data.draw(st.integers(1, vocab))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, vocab, generator=gen) * (1 + seed % 5)
    log_probs = torch.log_softmax(logits, -1)
    top_lp, top_ids = torch.topk(log_probs, k)
    stats = token_statistics(logits, top_ids, top_lp, k=k)
    assert stats.disagreement.abs().max().item() < 1e-5
    torch.testing.assert_close(
        stats.compatibility, top_lp.double().exp().sum(-1).clamp(0, 1), atol=1e-6, rtol=0
    )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(4, 50), data=st.data())
def test_ranges_and_chunk_independence(seed, vocab, data):
    k = data.draw(st.integers(1, vocab))
    kt = data.draw(st.integers(1, vocab))
    rows = data.draw(st.integers(1, 12))
    student_probs = data.draw(st.sampled_from(["exact", "topk_only"]))
    logits, ids, lps = random_case(seed, vocab, k, kt, rows)
    whole = token_statistics(logits, ids, lps, k=k, student_probs=student_probs)
    assert (whole.compatibility >= 0).all() and (whole.compatibility <= 1).all()
    assert (whole.disagreement >= -1e-6).all()
    chunk = data.draw(st.integers(1, rows))
    chunked = token_statistics(logits, ids, lps, k=k, student_probs=student_probs, chunk_size=chunk)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)
    # S handed in (as the fsdp teacher does) instead of computed: the same statistics, in any chunking.
    given = token_statistics(
        logits,
        ids,
        lps,
        k=k,
        student_probs=student_probs,
        chunk_size=chunk,
        entropy_mode="topk",
        student_topk_ids=torch.topk(logits, k).indices,
    )
    for a, b in zip(
        token_statistics(logits, ids, lps, k=k, student_probs=student_probs, entropy_mode="topk"),
        given,
        strict=True,
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_blocks_and_sub_blocks_match_reference(monkeypatch, dtype):
    # Shrink the default block sizes so a small input spans several blocks and entropy sub-blocks.
    monkeypatch.setattr(teachability, "_BLOCK_BYTES", 4 * 40 * 7)
    monkeypatch.setattr(teachability, "_SUB_BLOCK_BYTES", 4 * 40 * 3)
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(5, 6, 40, generator=gen) * 3).to(dtype)
    logits[0, 0, 5] = NEG_INF
    ids, lps, _ = make_teacher(logits.float(), 7, "random", gen)
    stats = token_statistics(logits, ids, lps, k=5)
    assert_matches(stats, reference(logits.float(), ids, lps, 5))
    whole = token_statistics(logits, ids, lps, k=5, chunk_size=30)
    for a, b in zip(stats, whole, strict=True):
        assert torch.equal(a, b)


def test_teacher_entries_equal_a_full_softmax_of_the_teacher_for_any_chunking():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 50, generator=generator).to(torch.bfloat16)
    student_logits = torch.randn(11, 50, generator=generator)
    student_topk_ids = student_logits.topk(4, dim=-1).indices
    sampled_ids = torch.randint(0, 50, (11,), generator=generator)
    probs = torch.softmax(logits.double(), dim=-1)  # the reference: the teacher's whole distribution
    for chunk_rows in (1, 4, 11, 64):
        top_ids, top_logprobs, at_student, at_sampled = teacher_entries(
            logit_log_prob_blocks(logits, vocab=50, block_rows=chunk_rows),
            student_topk_ids,
            sampled_ids,
            teacher_topk=6,
        )
        torch.testing.assert_close(top_logprobs.double(), probs.log().topk(6, dim=-1).values)
        torch.testing.assert_close(top_logprobs.double(), probs.log().gather(-1, top_ids))
        torch.testing.assert_close(at_student.double(), probs.log().gather(-1, student_topk_ids))
        torch.testing.assert_close(at_sampled.double(), probs[torch.arange(11), sampled_ids].log())
        # Exact C (Eq. 10): the teacher's mass on the student's top-k, from these entries.
        exact = token_statistics(
            student_logits, top_ids, top_logprobs, k=4, teacher_logprobs_at_student_topk=at_student
        )
        torch.testing.assert_close(
            exact.compatibility.double(), probs.gather(-1, student_topk_ids).sum(-1), rtol=1e-5, atol=1e-6
        )
