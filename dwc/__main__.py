from dwc.cli import main

main()
