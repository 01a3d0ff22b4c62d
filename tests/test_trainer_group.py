"""The trainers of a tensor-parallel server as one (trainer_group.py): rank 0's reply when all answer, the
refusal when all refuse alike, and when a rank dies or the ranks disagree, every rank stopped (the others
would wait on it forever) and the job failed as "trainer unavailable"; the next start starts all again."""

from __future__ import annotations

import asyncio

import pytest

from vllm_plasticity.contract.messages import Ping, TrainerError
from vllm_plasticity.trainer_client import TrainerUnavailable
from vllm_plasticity.trainer_group import TrainerGroup


class FakeRank:
    """A trainer process stand-in: answers with `reply` (an exception is raised), counts kills and starts."""

    def __init__(self, reply):
        self.reply, self.kills, self.starts, self.running = reply, 0, 0, True
        self.state, self.last_error, self.rendezvous = "ready", None, None

    async def start(self):
        self.starts += 1
        self.running = True

    async def request(self, msg, timeout=None):
        await asyncio.sleep(0)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply

    def alive(self):
        return self.running

    def kill(self):
        self.kills += 1
        self.running = False


def group_of(*replies, tmp_path) -> TrainerGroup:
    group = TrainerGroup(tmp_path, [tmp_path / "a.json", tmp_path / "b.json"], "model")
    group.clients = [FakeRank(r) for r in replies]
    return group


def test_all_answer_rank_0s_reply(tmp_path):
    group = group_of("rank 0", "rank 1", tmp_path=tmp_path)
    assert asyncio.run(group.request(Ping())) == "rank 0"
    assert [c.kills for c in group.clients] == [0, 0]


def test_all_refuse_alike_is_one_refusal_and_nobody_is_stopped(tmp_path):
    group = group_of(TrainerError("rejected", "non-finite"), TrainerError("rejected", "non-finite"), tmp_path=tmp_path)
    with pytest.raises(TrainerError, match="non-finite"):
        asyncio.run(group.request(Ping()))
    assert [c.kills for c in group.clients] == [0, 0] and group.alive()


@pytest.mark.parametrize("other", [TrainerUnavailable("the trainer exited (killed by signal 9)"),
                                   TrainerError("internal", "RuntimeError: Connection closed by peer")],
                         ids=["a rank died", "the ranks disagree"])
def test_a_dead_or_disagreeing_rank_stops_every_rank_and_the_next_start_starts_all(other, tmp_path):
    group = group_of("ok", other, tmp_path=tmp_path)
    with pytest.raises(TrainerUnavailable, match="every shard's trainer was stopped"):
        asyncio.run(group.request(Ping()))
    assert all(c.kills >= 1 for c in group.clients) and not group.alive()
    assert group.state == "failed" and "rank 1" in group.last_error
    asyncio.run(group.ensure_started())
    assert [c.starts for c in group.clients] == [1, 1] and group.alive()
    assert len({c.rendezvous for c in group.clients}) == 1  # one fresh meeting place for all ranks
