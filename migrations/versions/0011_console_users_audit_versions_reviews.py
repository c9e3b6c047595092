"""console: users, audit trail, saved rule versions, flag reviews, paused destinations, stage beats; instance.request_at

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 02:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'flag_review',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('finding', sa.String(length=64), nullable=False),
        sa.Column('comment', sa.Text(), nullable=True),
        sa.Column('by', sa.String(length=64), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['study_id'], ['study.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_id', 'kind', 'sop_instance_uid', name='uq_flag_review'),
    )
    op.create_index('ix_flag_review_study_id', 'flag_review', ['study_id'])
    op.create_table(
        'console_user',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('password_hash', sa.String(length=256), nullable=False),
        sa.Column('token_sha256', sa.String(length=64), nullable=True),
        sa.Column('disabled', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
        sa.UniqueConstraint('token_sha256'),
    )
    op.create_table(
        'console_session',
        sa.Column('token_sha256', sa.String(length=64), nullable=False),
        sa.Column('user', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('token_sha256'),
    )
    op.create_index('ix_console_session_user', 'console_session', ['user'])
    op.create_table(
        'console_secret',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('secret', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'audit',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('actor', sa.String(length=64), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=True),
        sa.Column('action', sa.String(length=48), nullable=False),
        sa.Column('target', sa.String(length=256), nullable=True),
        sa.Column('result', sa.String(length=16), nullable=False),
        sa.Column('detail', sa.JSON(), nullable=False),
        sa.Column('node', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    for col in ('at', 'actor', 'address', 'action'):
        op.create_index(f'ix_audit_{col}', 'audit', [col])
    op.create_table(
        'rules_version',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('diff', sa.Text(), nullable=False),
        sa.Column('saved_by', sa.String(length=64), nullable=False),
        sa.Column('saved_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('restored_from', sa.Integer(), nullable=True),
        sa.Column('comment', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_rules_version_kind', 'rules_version', ['kind'])
    op.create_table(
        'destination_pause',
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('by', sa.String(length=64), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('destination'),
    )
    op.create_table(
        'stage_beat',
        sa.Column('node', sa.String(length=64), nullable=False),
        sa.Column('stage', sa.String(length=64), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=True),
        sa.Column('alive', sa.Boolean(), nullable=False),
        sa.Column('beat_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('node', 'stage'),
    )


def downgrade() -> None:
    for table in ('stage_beat', 'destination_pause', 'rules_version', 'audit', 'console_secret', 'console_session',
                  'console_user', 'flag_review'):
        op.drop_table(table)
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_column('request_at')
