import trio

async def test_trio_mode_runs():
    await trio.sleep(0)
