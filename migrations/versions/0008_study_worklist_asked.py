"""study: when the worklist was asked for its order, and when to ask again

The worklist query left the routing tick for a stage of its own
(``nnrouter.orders.worklist_poll``); the two meet in these columns. The
router waits for ``worklist_asked_at`` before it checks a study against its
orders. Rows from before (NULL) are asked once, if still undecided.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worklist_asked_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('worklist_next_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('worklist_next_at')
        batch_op.drop_column('worklist_asked_at')
