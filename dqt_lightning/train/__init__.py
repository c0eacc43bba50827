"""How it is trained: the precision plugin, the quantized-update callback, optimizer states, bit-width schedules,
weight telemetry and checkpoint I/O."""
