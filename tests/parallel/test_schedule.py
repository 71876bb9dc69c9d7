"""Pipeline schedules and the simulator: every generated table is valid (checked again here by
an independent replay), memory and bubbles against the closed forms of the papers."""

import numpy as np
import pytest

from parallel.pipeline.buffers import LOCAL, NONE, UP, plan_buffers
from parallel.pipeline.schedule import BW, B, F, IDLE, SCHEDULES, W, check, make_schedule
from parallel.pipeline.simulate import draw, simulate

CASES = [(p, m) for p in (2, 4, 8) for m in (p, 2 * p, 4 * p)]


def _replay(s):
  """Stage by stage, tick by tick: what each action needs must have run on an earlier tick."""
  ran = {}
  for t in range(s.ticks):
    for st in range(s.stages):
      k = int(s.kind[t, st])
      if k == IDLE:
        continue
      mb, part = int(s.microbatch[t, st]), s.part(st, int(s.chunk[t, st]))
      back = B if s.split_backward else BW
      needs = {F: [(F, mb, part - 1)] if part else [],
               B: [(F, mb, part)] + ([(back, mb, part + 1)] if part < s.n_parts - 1 else []),
               BW: [(F, mb, part)] + ([(back, mb, part + 1)] if part < s.n_parts - 1 else []),
               W: [(B, mb, part)]}[k]
      for need in needs:
        assert ran.get(need, t) < t, (s.name, t, st, (k, mb, part), need)
      ran[(k, mb, part)] = t
  assert len(ran) == s.microbatches * s.n_parts * (3 if s.split_backward else 2)


@pytest.mark.parametrize("p,m", CASES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_tables_are_valid(name, p, m):
  s = make_schedule(name, p, m, 2 if name in ("circular", "interleaved", "zb-v") else 1)
  _replay(s)
  check(s)


@pytest.mark.parametrize("p,m", CASES)
def test_bubbles_match_the_closed_forms(p, m):
  """With F = B + W (a tick is a tick): GPipe and 1F1B (p-1)/(m+p-1); interleaving two chunks
  (p-1)/(2m+p-1)."""
  sim = lambda name, chunks=1: simulate(make_schedule(name, p, m, chunks), f=1.0, b=1.0, w=0.0)["bubble"]
  assert sim("gpipe") == pytest.approx((p - 1) / (m + p - 1))
  assert sim("1f1b") == pytest.approx((p - 1) / (m + p - 1))
  assert sim("circular", 2) == pytest.approx((p - 1) / (2 * m + p - 1))
  assert sim("interleaved", 2) == pytest.approx((p - 1) / (2 * m + p - 1))


@pytest.mark.parametrize("p,m", [(4, 8), (4, 16), (8, 16), (8, 32)])
def test_zero_bubble_schedules(p, m):
  """F = B = W: ZB-H1 idles at most about a third as long as 1F1B (with 1F1B's forwards in
  flight); ZB-V less than ZB-H1; W really runs after B, often much later."""
  f1b, h1, v = (simulate(make_schedule(n, p, m), 1.0, 1.0, 1.0) for n in ("1f1b", "zb-h1", "zb-v"))
  idle = lambda r: r["time"] - 3 * m
  assert idle(h1) <= 0.4 * idle(f1b)
  assert v["bubble"] < h1["bubble"] < f1b["bubble"]
  s = make_schedule("zb-h1", p, m)
  gaps = [np.argwhere((s.kind == W) & (s.microbatch == mb))[0][0] - np.argwhere((s.kind == B) & (s.microbatch == mb))[0][0]
          for mb in range(m)]
  assert min(gaps) >= 1 and max(gaps) > 1


@pytest.mark.parametrize("p,m,v,first_b,forwards", [
    (2, 4, 2, [5, 4], [4, 3]),
    (4, 8, 2, [11, 10, 9, 8], [8, 7, 6, 5]),
    (3, 3, 3, [11, 10, 9], [9, 8, 7]),
])
def test_interleaved_warmup_and_first_backward(p, m, v, first_b, forwards):
  """Microbatch 0 goes up the v*p parts one tick each (part j at tick j), the last part's
  backward runs at tick v*p, and its gradient comes down a stage per tick: stage s's first
  backward is at tick v*p + p-1-s. Before it, stage s has run its warm-up of (p-s-1) + (v-1)*p
  forwards and one more (the steady state starts with a forward): p=4, v=2 gives 7+1, 6+1, 5+1,
  4+1. Megatron-LM's warm-up, 2(p-s-1) + (v-1)*p, would run p-s-1 more forwards before the same
  tick (see `schedule._megatron_interleaved`)."""
  s = make_schedule("interleaved", p, m, v)
  got_b = [int(np.argmax(s.kind[:, st] == BW)) for st in range(p)]
  assert got_b == first_b
  assert [int(np.sum(s.kind[:got_b[st], st] == F)) for st in range(p)] == forwards
  assert [(int(s.microbatch[t, st]), int(s.chunk[t, st])) for st, t in enumerate(got_b)] == [(0, v - 1)] * p


@pytest.mark.parametrize("p,m", CASES)
def test_activation_memory(p, m):
  """Peak microbatch inputs held per stage (from arrival to last use): GPipe all m; 1F1B p on
  the first stage, p - s + 1 on the others (an input arrives a tick before its forward)."""
  peak = lambda name: simulate(make_schedule(name, p, m))["peak_stored"]
  assert peak("gpipe") == [m] * p
  assert peak("1f1b") == [p] + [p - s + 1 for s in range(1, p)]


def test_buffers_by_hand():
  """GPipe, p=2, m=2. Ticks: F0 | F1,F0 | F1 | B0 | B1,B0 | B1 (stage 0 first). Stage 0 computes
  its inputs (part 0) and sends each up; stage 1 stores them on arrival, a tick later, and holds
  both until its backwards; gradients go down. Each stage needs 2 input slots; stage 0 uses each
  arriving gradient in the tick it arrives, so one gradient slot serves both (freed, then reused)."""
  b = plan_buffers(make_schedule("gpipe", 2, 2))
  assert b.x_slots == 2 and b.held.max(axis=0).tolist() == [2, 2]
  assert b.send_x[:3, 0].tolist() == [UP, UP, NONE] and b.send_x[:, 1].tolist() == [NONE] * 6
  assert b.arrive_x_up[:, 1].tolist() == [-1, 0, 1, -1, -1, -1]
  assert b.arrive_g_down[:, 0].tolist() == [-1, -1, -1, -1, 0, 0] and b.g_slots == 1
  assert b.first[:, 0].tolist() == [1, 1, 0, 0, 1, 1] and b.last[:, 1].tolist() == [0, 1, 1, 1, 1, 0]
  assert (b.local_slot == -1).all() and LOCAL not in b.send_x
  # With vocabulary parallelism every tick knows which microbatch's embedding and head run.
  v = plan_buffers(make_schedule("gpipe", 2, 2), vocab_parallel=True)
  assert v.embed_mb[:, 1].tolist() == [0, 1, -1, -1, -1, -1] and v.head_mb[:, 0].tolist() == [-1, 0, 1, -1, -1, -1]
  assert v.embed_grad_mb[:, 0].tolist() == [-1, -1, -1, -1, 0, 1]


def test_head_on_the_last_stage_or_split_over_all():
  """GPipe, p=2, m=2, F=B=1 (W=0), head 4, by hand. Ticks: F0 | F1,F0 | F1 | B0 | B1,B0 | B1.
  Last stage: each backward also runs the head, 1+4: 1+1+1+5+5+1 = 14; stage work 4 and 12, idle
  1 - 16/28. Split: the two ticks of the last stage's forwards last 1 + 4/2: 1+3+3+1+1+1 = 10;
  work 8 and 8, idle 1 - 16/20."""
  s = make_schedule("gpipe", 2, 2)
  last, split = simulate(s, 1, 1, 0, head=4), simulate(s, 1, 1, 0, head=4, vocab_parallel=True)
  assert (last["time"], split["time"]) == (14.0, 10.0)
  np.testing.assert_allclose((last["bubble"], split["bubble"]), (1 - 16 / 28, 1 - 16 / 20))
  for name in SCHEDULES:  # the same work either way, and no head is no change
    s = make_schedule(name, 4, 8, 2 if name in ("circular", "interleaved", "zb-v") else 1)
    runs = [simulate(s, 1, 1, 1, head=h, vocab_parallel=vp) for h, vp in ((3, False), (3, True), (0, True))]
    work = [r["time"] * (1 - r["bubble"]) for r in runs[:2]]
    np.testing.assert_allclose(work[0], work[1])
    assert runs[1]["time"] < runs[0]["time"]
    assert runs[2]["time"] == simulate(s, 1, 1, 1)["time"]


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (3, 6, 2), (4, 8, 3)])
def test_each_stage_is_busy_m_times_f_plus_b_plus_w(p, m, v):
  """Each stage runs F, B and W (or both halves of the backward at once) of each microbatch on
  each of its parts, and a part of a stage with c parts costs 1/c of the whole stage's action: m
  (F + B + W) per stage, whatever the schedule, the chunk count and the transfer cost."""
  f, b, w = 1.0, 1.75, 0.5
  for name in SCHEDULES:
    s = make_schedule(name, p, m, {"circular": v, "interleaved": v, "zb-v": 2}.get(name, 1))
    r = simulate(s, f, b, w, transfer=0.25)
    np.testing.assert_allclose(r["busy"], [m * (f + b + w)] * p, err_msg=name)
    assert r["bubble"] == pytest.approx(1 - m * (f + b + w) / r["time"]), name


# Hand-computed step times with a transfer cost: F = 1, B = 1.5, W = 0.5, transfer 0.25. A tick
# lasts its slowest action plus the transfer when some stage sends an activation or a gradient to
# another stage; the last part's forward (its output stays for its backward), the first part's
# backward, a V's turn on one stage and W send nothing.
TRANSFER_CASES = {
    # GPipe: ticks cost 1, 1, 1, 2, 2, 2 (a combined backward is B + W = 2); sends at ticks 0, 1
    # (F0, F1 up) and 3, 4 (B0, B1 down), not at 2 (stage 1's F1: the last part) nor 5 (stage 0's
    # B1: the first part): 9 + 4 x 0.25 = 10. Busy 2 x 3 = 6 per stage.
    ("gpipe", 2, 2): (["stage 0:  F0  F1   .   .  B0  B1",
                       "stage 1:   .  F0  F1  B0  B1   ."], 10.0),
    # ZB-H1: ticks cost 1, 1, 1.5, 1.5, 0.5, 1.5, 1.5, 0.5; sends at 0, 1 (F up) and 2, 5 (stage
    # 1's B down); tick 3 (stage 0's B0, stage 1's F1) and 6 (B1 of part 0, W1) send nothing, and
    # ticks 4 and 7 run only W: 9 + 4 x 0.25 = 10.
    ("zb-h1", 2, 2): (["stage 0:  F0  F1   .  B0  W0   .  B1  W1",
                       "stage 1:   .  F0  B0  F1  W0  B1  W1   ."], 10.0),
    # ZB-V: parts 0..3 on stages 0, 1, 1, 0, each action half its stage's cost (F 0.5, B 0.75,
    # W 0.25; lowercase: chunk 1). Ticks cost .5 .5 .5 .5 .75 .75 .25 .75 .25 .75 .25 .75 .75 .25
    # = 7.5. Sends: 0, 1 (F up), 2 (stage 1's f0 down), 4 (b0 and f1), 7 (b1 up, B0 down), 11
    # (B1 down); not 3 and 5 (the last part's forward and the turn's F1 / b0, kept on stage 1),
    # 9 (B0 of part 0; b1 turns locally), 12 (B1 of part 0) or the W-only ticks 6, 8, 10, 13:
    # 7.5 + 6 x 0.25 = 9.
    ("zb-v", 2, 2): (["stage 0:  F0  F1   .  f0  b0  f1  w0  b1  w1  B0  W0   .  B1  W1",
                      "stage 1:   .  F0  f0  F1  f1  b0  w0  B0  W0  b1  w1  B1  W1   ."], 9.0),
}


@pytest.mark.parametrize("name,p,m", TRANSFER_CASES)
def test_step_time_with_transfers_by_hand(name, p, m):
  table, time = TRANSFER_CASES[(name, p, m)]
  s = make_schedule(name, p, m)
  assert s.render().splitlines() == table
  r = simulate(s, 1.0, 1.5, 0.5, transfer=0.25)
  assert r["time"] == pytest.approx(time)
  assert r["bubble"] == pytest.approx(1 - m * 3.0 / time)


def test_errors_and_a_drawing(tmp_path):
  with pytest.raises(ValueError, match="schedule 'pipedream'"):
    make_schedule("pipedream", 4, 8)
  with pytest.raises(ValueError, match="interleaved: microbatches=6 must be a multiple of stages=4"):
    make_schedule("interleaved", 4, 6, 2)
  draw(make_schedule("zb-v", 2, 4), str(tmp_path / "zbv.png"))
  assert (tmp_path / "zbv.png").read_bytes()[:4] == b"\x89PNG"
