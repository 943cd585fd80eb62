from crystalign.cli import main

main()
