"""Size targets: the recipe that brings a model to a whole-model bits-per-weight target as stored.

target.py      the route: planner above the quantization floor, hybrid pipeline below it
sensitivity.py per-module KL of RTN options, measured end to end; joint KL of a whole plan
mixed_bits.py  options, exact costs, the knapsack, MixedBitsPlanner / plan_bits, the plan as a recipe
size_table.py  the file a plan writes, in bytes, from per-module tables of stored (and coded) tensors
fit.py         fitting a plan to its file (the size table's bytes), or refusing with reachable sizes
choice.py      the plan against the largest uniform recipes of that size, by GPTQ trials
hybrid.py      the pipeline below the quantization floor (block removal, low rank, distillation)
"""
