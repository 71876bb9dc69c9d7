"""Mixture of experts: routing, router losses, and the dispatch ops (capacity, dropless, expert
parallel over the plan's expert axes); `dispatch.experts_mlp` reads the plan and picks one.
MOE_SHARDING.md draws which mesh axis splits what."""
