"""Dialog with a chat model: `chatrl chat` (terminal) and `chatrl serve` (OpenAI-compatible API + web page).

- `generation.py`: `ChatModel` (loaded by `chatrl.models.loading`; render, start a `Decoding`), stop strings,
  detokenising; tokens are picked by the rollout sampler (`chatrl.rollout.sampling`).
- `worker.py`: `GenerationWorker`, the one thread that runs the model for the server.
- `chat.py`: `ChatSession` and the terminal loop.  `server.py`: `create_app(...)`; `run.py`: uvicorn.
- `reload.py`: live model swap (`POST /admin/reload`, `--watch`); `ratelimit.py`: `--rate-limit`.
"""
