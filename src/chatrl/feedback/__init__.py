"""What the people using `chatrl serve` say about its replies, kept for training (issue 21).

- `db.py`: the SQLAlchemy tables and `open_db` (SQLite in WAL mode, or any SQLAlchemy URL), schema upgraded to
  the newest Alembic revision (`migrations/`) on open.
- `store.py`: `FeedbackStore`: users and API keys, recording completions into conversations, feedback events.
- `api.py`: the server side: per-user auth, rate limit, `POST /v1/feedback`, `GET /v1/conversations`.
- `export.py`: feedback as training files: preference pairs, KTO rows, SFT chats.
- `commands.py`: `chatrl users add|list`, `chatrl feedback stats|export|leaderboard`.
- `arena.py`: `chatrl serve --arena`: `POST /v1/arena`, two anonymous replies of two models to one prompt.
- `leaderboard.py`: Bradley-Terry and Elo rankings of model versions from the stored choices.

SQLAlchemy and Alembic are the `feedback` extra (`pip install 'chatrl[feedback]'`).
"""
