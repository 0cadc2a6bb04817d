"""Dialog with a chat model: `chatrl chat` (terminal) and `chatrl serve` (OpenAI-compatible API + web page).

- `generation.py`: `ChatModel` (load, render, start a `Decoding`), sampling, stop strings, detokenising.
- `worker.py`: `GenerationWorker`, the one thread that runs the model for the server.
- `chat.py`: `ChatSession` and the terminal loop.  `server.py`: `create_app(...)`.
"""
