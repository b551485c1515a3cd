"""Storage drivers: how one step's root filesystem is put together from layers."""
