"""Image decoding: the pool the API worker keeps (pool.py) and the child processes it starts
(child.py), which decode under CPU and memory budgets. Never imports torch or transformers."""
