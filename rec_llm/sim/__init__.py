"""Cost model, cluster simulator, stage load balancer and parallelism planner.

Plain Python and numpy (only `measure.py` runs JAX), so planning a 1,024-device cluster
takes well under a second and needs no accelerator:

  cluster.py     cluster specs and presets (datasheet numbers, or this machine's calibration)
  cost_model.py  FLOPs, bytes, memory and collective times of one step's pieces
  simulator.py   a plan -> step time, throughput, MFU, memory, timeline (Chrome trace)
  partition.py   blocks -> pipeline stages, min over contiguous partitions of the slowest stage
  planner.py     enumerate data x tensor x pipe, schedules, microbatches, compression; rank
  balance.py     decide whether re-partitioning the stages pays for moving the state
  measure.py     microbenchmarks on the current devices -> a calibration JSON
"""
