"""Autoresearch: an agent edits the research surface, the harness runs fixed-budget experiments and
keeps a change only when val_bpb improved by more than the measured noise. See program.md."""
