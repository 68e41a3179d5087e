"""Operations: logging set-up, status, systemd notify."""
