"""The queues between a driver and its worker group's ranks, all held by one Ray actor: a group's
start spawns one process for them rather than one per rank, and that process imports neither torch
nor the rest of raysslvit (messages travel pickled)."""
from __future__ import annotations

import asyncio

import ray


@ray.remote(num_cpus=0)
class _Boxes:
    """One asyncio queue per box; an async actor, so a rank waiting on its box blocks no one."""

    def __init__(self, names: list[str]):
        self.boxes = {name: asyncio.Queue() for name in names}

    async def put(self, name: str, item) -> None:
        await self.boxes[name].put(item)

    async def get(self, name: str):
        return await self.boxes[name].get()


class Mailbox:
    """One box of the shared actor: `put` and a blocking `get`, as `ray.util.queue.Queue` has."""

    def __init__(self, boxes, name: str):
        self.boxes, self.name = boxes, name

    def put(self, item) -> None:
        ray.get(self.boxes.put.remote(self.name, item))

    def get(self):
        return ray.get(self.boxes.get.remote(self.name))


def mailboxes(names: list[str]) -> dict[str, Mailbox]:
    """A box per name, in one new actor owned by the caller (it outlives a worker that dies)."""
    boxes = _Boxes.remote(names)
    return {name: Mailbox(boxes, name) for name in names}
