from mmdx.cli import main

main()
