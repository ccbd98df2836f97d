"""Late frames: frames that arrive for a closed coil are kept (not merged) and counted.

Their components are stored with ``late`` set, so a coil's records keep reading only the frames
merged at close. Rows written by revision 0001 are not late.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "late_frames",
        sa.Column("coil_id", sa.String(256), nullable=False),
        sa.Column("camera_id", sa.String(256), nullable=False),
        sa.Column("frame_id", sa.BigInteger, nullable=False),
        sa.Column("position_mm", sa.Double, nullable=False),
        sa.Column("received_unix_s", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("coil_id", "camera_id", "frame_id"),
    )
    with op.batch_alter_table("components") as batch:
        batch.add_column(sa.Column("late", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("components") as batch:
        batch.drop_column("late")
    op.drop_table("late_frames")
