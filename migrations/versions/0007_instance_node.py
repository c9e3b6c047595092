"""instance: the node whose spool holds the file

Nodes sharing one database each keep their own spool, so a row's ``path`` is
readable only on the node that received it; ``node`` names that node
(``node.name``). Rows from before (NULL) were made by a single node and stay
claimable by any node: what a single-machine install had, and what it keeps.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_column('node')
