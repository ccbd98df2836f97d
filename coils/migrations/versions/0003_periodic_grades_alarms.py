"""What the line acts on: a coil's periodic defects and grade (with the rule that decided it), and alarms.

``coils.periodic`` (JSON list of periodic defects), ``coils.grade`` and ``coils.grade_rule`` are set
when a coil closes; NULL on coils closed before this revision (their periodic defects are then found
on read). ``alarms`` keeps every alarm raised, with its acknowledgement.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("coils") as batch:
        batch.add_column(sa.Column("periodic", sa.Text, nullable=True))
        batch.add_column(sa.Column("grade", sa.String(64), nullable=True))
        batch.add_column(sa.Column("grade_rule", sa.Text, nullable=True))
    op.create_table(
        "alarms",
        sa.Column("alarm_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("severity", sa.Integer, nullable=False),
        sa.Column("coil_id", sa.String(256), nullable=False),
        sa.Column("camera_id", sa.String(256), nullable=False),
        sa.Column("position_mm", sa.Double, nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("raised_unix_s", sa.Double, nullable=False),
        sa.Column("acknowledged_unix_s", sa.Double, nullable=True),
        sa.Column("acknowledged_by", sa.String(256), nullable=False, server_default=""),
    )
    op.create_index("alarms_by_raised", "alarms", ["raised_unix_s"])


def downgrade() -> None:
    op.drop_table("alarms")
    with op.batch_alter_table("coils") as batch:
        for column in ("grade_rule", "grade", "periodic"):
            batch.drop_column(column)
