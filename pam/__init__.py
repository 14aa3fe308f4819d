"""PAM integration (pam_python module). Arrives with the PAM issue."""
