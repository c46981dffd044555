"""Session affinity end to end (the shipped default profile): a conversation's turns stay on
one engine, through the ingress deciding here and through the scheduler service alike, while
requests without a session spread by load."""

from __future__ import annotations

import random
from collections import Counter

import aiohttp
import pytest

from ..stack import Stack

MODEL = "infermesh/tiny-llama"


def _prompt(rng: random.Random) -> str:
    """Unrelated prompts: no prefix in common, so only the session can keep them together."""
    vocab = ("alpha beta gamma delta river stone cloud light north quiet engine market window "
             "garden silver paper orange copper tiger violet").split()
    return " ".join(rng.choice(vocab) for _ in range(40))


async def _turn(http: aiohttp.ClientSession, stack: Stack, prompt: str,
                headers: dict[str, str]) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with http.post(stack.ingress_url + "/v1/completions", json=body,
                         headers=headers) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-infermesh-endpoint"]


@pytest.mark.parametrize("schedule_here", [True, False])
async def test_a_conversation_stays_on_one_engine(stack_factory, schedule_here: bool) -> None:
    """Decided in the ingress, or by the scheduler service (which learns the session from the
    routed events it announces, as every replica does)."""
    stack = stack_factory(engines=3, settings={"ingress": {"schedule_here": schedule_here}})
    rng = random.Random(11)
    async with aiohttp.ClientSession() as http:
        for session in ("conv-a", "conv-b"):
            pods = {await _turn(http, stack, _prompt(rng), {"x-session-id": session})
                    for _ in range(8)}
            assert len(pods) == 1, (session, pods)
        # The cookie does the same.
        pods = {await _turn(http, stack, _prompt(rng), {"Cookie": "infermesh-session=conv-c"})
                for _ in range(6)}
        assert len(pods) == 1, pods
        # Without a session the same kind of requests spread (ties broken at random).
        spread = Counter([await _turn(http, stack, _prompt(rng), {}) for _ in range(12)])
        assert len(spread) > 1, spread
