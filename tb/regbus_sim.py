"""Register-bus master and slave models for Amaranth simulator testbenches."""


async def regbus_write(ctx, bus, addr, data, strb=0xF):
    """One write; waits while ``ready`` is low."""
    ctx.set(bus.addr, addr)
    ctx.set(bus.w_data, data)
    ctx.set(bus.w_strb, strb)
    ctx.set(bus.w_stb, 1)
    await ctx.tick().until(bus.ready)
    ctx.set(bus.w_stb, 0)


async def regbus_read(ctx, bus, addr, strb=0xF):
    """One read; returns ``r_data`` of the cycle after the accepted access."""
    ctx.set(bus.addr, addr)
    ctx.set(bus.r_strb, strb)
    ctx.set(bus.r_stb, 1)
    await ctx.tick().until(bus.ready)
    ctx.set(bus.r_stb, 0)
    return ctx.get(bus.r_data)
