"""ledger report index

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('llm_ledger', schema=None) as batch_op:
        batch_op.create_index('ix_llm_ledger_report', ['intent', 'task', 'provider', 'model', 'price_version', 'at', 'cache_hit', 'outcome', 'input_tokens', 'cache_write_tokens', 'cache_read_tokens', 'output_tokens', 'reasoning_tokens', 'cost_usd'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('llm_ledger', schema=None) as batch_op:
        batch_op.drop_index('ix_llm_ledger_report')

