"""rules_load: the node that loaded a file, and the text of each version that loaded

The router loads the rule file and decides; the forwarder delivers with the
destinations of the same version, read from here rather than from the file
(which an admin may have changed since, to a version the router refused).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 13:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rules_load', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('text', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rules_load', schema=None) as batch_op:
        batch_op.drop_column('text')
        batch_op.drop_column('node')
