from legend.cli import main

main()
