"""The buffer between a run's producer and its consumer: order, bound, waiting on either side."""

from __future__ import annotations

import asyncio

import pytest

from chat.event_buffer import EventBuffer


async def test_items_come_out_in_order_and_the_bound_holds() -> None:
    buffer: EventBuffer[int] = EventBuffer(3)
    for n in range(3):
        buffer.put_nowait(n)
    assert buffer.full() and buffer.qsize() == 3
    with pytest.raises(asyncio.QueueFull):
        buffer.put_nowait(3)
    assert [await buffer.get() for _ in range(3)] == [0, 1, 2]
    assert buffer.qsize() == 0 and not buffer.full()


async def test_a_consumer_waits_for_the_next_item() -> None:
    buffer: EventBuffer[str] = EventBuffer(2)
    getting = asyncio.create_task(buffer.get())
    await asyncio.sleep(0.01)
    assert not getting.done()
    buffer.put_nowait("a")
    assert await asyncio.wait_for(getting, timeout=1) == "a"


async def test_a_producer_waits_for_room_and_a_slow_one_can_be_timed_out() -> None:
    buffer: EventBuffer[int] = EventBuffer(1)
    buffer.put_nowait(1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(buffer.put(2), timeout=0.05)  # nobody reads
    putting = asyncio.create_task(buffer.put(3))
    await asyncio.sleep(0.01)
    assert not putting.done()
    assert await buffer.get() == 1
    await asyncio.wait_for(putting, timeout=1)
    assert await buffer.get() == 3 and buffer.qsize() == 0  # the timed-out 2 never went in


async def test_a_consumer_that_gave_up_waiting_leaves_the_buffer_usable() -> None:
    buffer: EventBuffer[int] = EventBuffer(2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(buffer.get(), timeout=0.05)
    buffer.put_nowait(7)
    assert await asyncio.wait_for(buffer.get(), timeout=1) == 7


async def test_close_ends_the_stream_after_the_items_even_when_full() -> None:
    """The producer's end takes no room: a full buffer (a client that stopped reading) still ends."""
    buffer: EventBuffer[int] = EventBuffer(2)
    buffer.put_nowait(1)
    buffer.put_nowait(2)
    buffer.close()
    assert buffer.qsize() == 2
    assert [await buffer.get() for _ in range(4)] == [1, 2, None, None]


async def test_close_wakes_a_waiting_consumer() -> None:
    buffer: EventBuffer[int] = EventBuffer(1)
    getting = asyncio.create_task(buffer.get())
    await asyncio.sleep(0.01)
    assert not getting.done()
    buffer.close()
    assert await asyncio.wait_for(getting, timeout=1) is None
