"""instance: its header (the data set without pixels), kept in the store

The file is in the spool of the node that received it; the router, the SR
and the order check read the header from the row instead, on whichever node
decides the study (``nnrouter.core.headers``). Rows from before (NULL) are
read from their file where it is.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 22:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.add_column(sa.Column('header', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_column('header')
