"""What one update costs without running it: FLOPs counted and GPU memory traced on the meta
device (tensors with shapes and no storage), from the model folders' configs alone.

trace.py: the counter (FLOPs by phase, live tensor bytes and their peak) and the fused
attention a GPU runs; parts.py: the sd task's networks built on meta from configs;
update.py: one update's phases, per design and per method; model_configs.py: the shipped
configs of each family at full size; small_tasks.py: gmm2d's and digits' own networks and
loss, traced on the CPU; memory.py: a card's memory and the fit verdict; report.py: the dry
run's section."""
