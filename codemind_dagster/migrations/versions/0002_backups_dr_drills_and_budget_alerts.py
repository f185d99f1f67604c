"""backups, dr drills and budget alerts

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('backups',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('data_as_of', sa.DateTime(timezone=True), nullable=False),
    sa.Column('location', sa.String(length=1024), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('budget_alerts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('scope', sa.String(length=128), nullable=False),
    sa.Column('threshold_percent', sa.Integer(), nullable=False),
    sa.Column('spend_usd', sa.Numeric(precision=18, scale=8), nullable=False),
    sa.Column('budget_usd', sa.Numeric(precision=18, scale=8), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('scope', 'threshold_percent', name='uq_budget_alert')
    )
    op.create_table('dr_drills',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('backup_id', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.Column('rpo_s', sa.Float(), nullable=False),
    sa.Column('rto_s', sa.Float(), nullable=False),
    sa.Column('checks', sa.JSON(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('dr_drills', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dr_drills_backup_id'), ['backup_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('dr_drills', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dr_drills_backup_id'))

    op.drop_table('dr_drills')
    op.drop_table('budget_alerts')
    op.drop_table('backups')
