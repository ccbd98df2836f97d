"""The first schema: coils, their frames, the frames' mask components, and the records made at close.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(256)  # camera and coil ids: at most 256 bytes of UTF-8 (client.wire)


def _frame_key() -> list[sa.Column]:
    return [sa.Column("coil_id", ID, nullable=False), sa.Column("camera_id", ID, nullable=False),
            sa.Column("frame_id", sa.BigInteger, nullable=False)]


def upgrade() -> None:
    op.create_table(
        "coils",
        sa.Column("coil_id", ID, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("opened_unix_s", sa.Double, nullable=False),
        sa.Column("last_frame_unix_s", sa.Double, nullable=False),
        sa.Column("far_end_mm", sa.Double, nullable=False),
        sa.Column("closed_unix_s", sa.Double, nullable=True),
        sa.Column("close_reason", sa.String(16), nullable=False, server_default=""),
        sa.Column("end_length_mm", sa.Double, nullable=True),
        sa.Column("summary", sa.Text, nullable=True),
    )
    op.create_index("coils_by_opened", "coils", ["opened_unix_s"])
    op.create_index("coils_by_state", "coils", ["state", "last_frame_unix_s"])
    op.create_table(
        "frames", *_frame_key(),
        sa.Column("position_mm", sa.Double, nullable=False),
        sa.Column("received_unix_s", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("coil_id", "camera_id", "frame_id"),
    )
    op.create_table(
        "components", *_frame_key(),
        sa.Column("component_no", sa.Integer, nullable=False),
        sa.Column("class_id", sa.Integer, nullable=False),
        sa.Column("along_start_mm", sa.Double, nullable=False),
        sa.Column("across_start_mm", sa.Double, nullable=False),
        sa.Column("mm_per_px_along", sa.Double, nullable=False),
        sa.Column("mm_per_px_across", sa.Double, nullable=False),
        sa.Column("pixel_count", sa.Integer, nullable=False),
        sa.Column("area_mm2", sa.Double, nullable=False),
        sa.Column("max_probability", sa.Double, nullable=True),
        sa.Column("mask_rows", sa.Integer, nullable=False),
        sa.Column("mask_cols", sa.Integer, nullable=False),
        sa.Column("mask", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("coil_id", "camera_id", "frame_id", "component_no"),
    )
    op.create_table(
        "records",
        sa.Column("coil_id", ID, nullable=False),
        sa.Column("record_no", sa.Integer, nullable=False),
        sa.Column("class_id", sa.Integer, nullable=False),
        sa.Column("along_start_mm", sa.Double, nullable=False),
        sa.Column("along_end_mm", sa.Double, nullable=False),
        sa.Column("across_start_mm", sa.Double, nullable=False),
        sa.Column("across_end_mm", sa.Double, nullable=False),
        sa.Column("area_mm2", sa.Double, nullable=False),
        sa.Column("max_probability", sa.Double, nullable=True),
        sa.Column("frames", sa.Text, nullable=False),  # JSON [[camera_id, frame_id], ...]
        sa.Column("cameras", sa.Text, nullable=False),  # JSON [camera_id, ...]
        sa.PrimaryKeyConstraint("coil_id", "record_no"),
    )


def downgrade() -> None:
    for table in ("records", "components", "frames", "coils"):
        op.drop_table(table)
