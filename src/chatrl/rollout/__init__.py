"""The rollout chain: Hybrid Engine (inference copy of the actor), batched decode loop, compiled decode step, sampling, and multi-turn episodes in text environments."""
