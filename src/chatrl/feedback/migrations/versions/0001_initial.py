"""users, conversations, messages, feedback

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("conversation_id", sa.Integer(), sa.ForeignKey("conversations.id"), nullable=False, index=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=True, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False, index=True),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True, index=True),
        sa.Column("sampling", sa.Text(), nullable=True),
        sa.Column("completion_id", sa.String(64), nullable=True, unique=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("kind", sa.String(8), nullable=False, index=True),
        sa.Column("message_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=True, index=True),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("prompt_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=True),
        sa.Column("chosen_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=True),
        sa.Column("rejected_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=True),
        sa.Column("edited", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("feedback", "messages", "conversations", "users"):
        op.drop_table(table)
